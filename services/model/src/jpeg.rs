//! JPEG decoding bit-identical to Pillow's `Image.open(f).convert("RGB")`.
//!
//! Pillow decodes JPEG with libjpeg-turbo (ISLOW integer IDCT, fancy chroma upsampling, its
//! fixed-point YCbCr tables). The `image` crate's decoder (zune-jpeg) rounds differently, so
//! JPEGs go through the `mozjpeg` crate instead: mozjpeg-sys builds the libjpeg-turbo-derived C
//! decoder with the `cc` crate (no SIMD, so no nasm or cmake; libjpeg-turbo's SIMD routines give
//! the same bytes as its C ones on valid data, see below).
//!
//! What follows Pillow (checked against Pillow 13.0 / libjpeg-turbo 3.x):
//! - Greyscale (1 component) and 3-component (YCbCr or Adobe RGB) JPEGs are decoded by libjpeg
//!   straight to RGB; for greyscale that equals Pillow's `L` -> `RGB` replication.
//! - 4-component (CMYK / YCCK) JPEGs: libjpeg outputs CMYK, Pillow always assumes Adobe's
//!   inverted polarity (`CMYK;I`, each byte `255 - v`) and converts with `cmyk2rgb`; see
//!   [`cmyk_inverted_to_rgb`]. Other component counts are refused, as Pillow does.
//! - Truncated data is an error (Pillow: "image file is truncated"): libjpeg-turbo would pad the
//!   missing data and only warn, so the decoder's reads past the end are tracked and one before
//!   the last scanline fails the decode. That is exactly when Pillow's suspending source runs
//!   dry; in practice it includes a file missing only its EOI marker, since the entropy decoder
//!   reads ahead into it. Other libjpeg warnings (corrupt data it recovers from) are silent and
//!   not errors, as in Pillow.
//! - Corrupt entropy data that libjpeg recovers from can give dequantised coefficients that
//!   overflow 16 bits; libjpeg-turbo's SIMD IDCT (Pillow's) and its C IDCT (used here) then
//!   differ near the damage. Valid JPEGs never reach that range, so they decode identically.
//! - Fatal libjpeg errors unwind out of the C code (mozjpeg's error manager) and are caught
//!   here, so corrupt input is an [`Error::Image`] with libjpeg's message; nothing is printed.

use std::cell::Cell;
use std::io::{BufRead, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};

use crate::error::{Error, Result};
use crate::processor::DecodeLimits;

/// JPEG's start-of-image marker plus the first byte of the next marker (Pillow's and the
/// `image` crate's signature test).
pub(crate) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG to RGB8 exactly as Pillow does, refusing dimensions over `limits` from the
/// header before any pixel buffer is allocated.
pub(crate) fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    match catch_unwind(AssertUnwindSafe(|| decode_unguarded(bytes, limits))) {
        Ok(result) => result,
        Err(payload) => {
            let reason = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            Err(jpeg_err(reason))
        }
    }
}

fn jpeg_err(reason: impl std::fmt::Display) -> Error {
    Error::Image(format!("cannot decode Jpeg: {reason}"))
}

/// May unwind with libjpeg's error message; [`decode`] catches it.
fn decode_unguarded(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    let overran = Cell::new(false);
    let source = TrackedSlice {
        data: bytes,
        pos: 0,
        overran: &overran,
    };
    let header = Decompress::builder()
        .from_reader(source)
        .map_err(|e| jpeg_err(format!("cannot read header: {e}")))?;
    let (w, h) = (header.width(), header.height());
    let components = header.components().len();
    check_limits(w, h, components, limits)?;
    let (w32, h32) = (w as u32, h as u32);
    let cmyk = match components {
        1 | 3 => false,
        4 => true,
        n => {
            return Err(Error::Image(format!(
                "unsupported JPEG colour space: {n} components ({:?})",
                header.color_space()
            )))
        }
    };
    let out_space = if cmyk {
        ColorSpace::JCS_CMYK
    } else {
        ColorSpace::JCS_RGB
    };
    let mut started = header
        .to_colorspace(out_space)
        .map_err(|e| jpeg_err(format!("cannot start decompression: {e}")))?;
    if (started.width(), started.height()) != (w, h) {
        return Err(jpeg_err("output size differs from the header"));
    }
    let pixels: Vec<u8> = started.read_scanlines().map_err(jpeg_err)?;
    if overran.get() {
        return Err(jpeg_err(
            "image file is truncated (premature end of JPEG data)",
        ));
    }
    // Reads up to EOI, as Pillow does: running out of data here is not an error (Pillow ignores
    // a suspension after the last scanline), a fatal error in the trailing markers is (unwinds).
    started.finish().map_err(jpeg_err)?;
    let rgb = if cmyk {
        cmyk_inverted_to_rgb(&pixels)
    } else {
        pixels
    };
    RgbImage::from_raw(w32, h32, rgb).ok_or_else(|| jpeg_err("decoded buffer has the wrong size"))
}

/// The header's size against the limits, and the output buffer against `max_alloc`.
fn check_limits(w: usize, h: usize, components: usize, limits: &DecodeLimits) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("image has zero size {w}x{h}")));
    }
    let pixels = w as u64 * h as u64;
    let too_wide = u32::try_from(w).map_or(true, |w| w > limits.max_width);
    let too_tall = u32::try_from(h).map_or(true, |h| h > limits.max_height);
    if too_wide || too_tall || pixels > limits.max_pixels {
        return Err(Error::Image(format!(
            "image is {w}x{h} ({pixels} pixels), over the limits {}x{} / {} pixels",
            limits.max_width, limits.max_height, limits.max_pixels
        )));
    }
    // The decoded buffer (4 bytes a pixel for CMYK) plus the RGB image made from it.
    let bytes = pixels * if components == 4 { 4 + 3 } else { 3 };
    if bytes > limits.max_alloc {
        return Err(Error::Image(format!(
            "decoding {w}x{h} needs {bytes} bytes, over the limit of {}",
            limits.max_alloc
        )));
    }
    Ok(())
}

/// Pillow's `CMYK;I` unpacker (`255 - v`) followed by `Convert.c` `cmyk2rgb`:
/// `nk - nk * c / 255` with Pillow's rounded `MULDIV255`, where `nk = 255 - k`.
fn cmyk_inverted_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let tmp = a * b + 128;
        ((tmp >> 8) + tmp) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|px| {
            let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| u32::from(255 - v));
            let nk = 255 - k;
            [c, m, y].map(|v| nk.saturating_sub(muldiv255(v, nk)) as u8)
        })
        .collect()
}

/// The input bytes as a `BufRead` that records whether the decoder asked for data past the end.
struct TrackedSlice<'a> {
    data: &'a [u8],
    pos: usize,
    overran: &'a Cell<bool>,
}

impl Read for TrackedSlice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.get(self.pos..).unwrap_or_default().read(buf)?;
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for TrackedSlice<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        if rest.is_empty() {
            self.overran.set(true);
        }
        Ok(rest)
    }

    fn consume(&mut self, amt: usize) {
        self.pos = self.pos.saturating_add(amt).min(self.data.len());
    }
}
