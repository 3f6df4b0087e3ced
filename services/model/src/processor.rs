//! Image preprocessing equal to transformers' `BlipImageProcessorPil` (Pillow backend):
//! decode under limits -> RGB -> Pillow BICUBIC resize to exactly `height x width` (no aspect
//! preservation, no crop) -> `x * rescale_factor` -> `(x - mean) / std` -> f32 `[3, H, W]`.
//!
//! Parity notes (checked against Pillow 13.0 and transformers 5.24):
//! - RGB conversion follows transformers' `convert_to_rgb`: an image with an alpha band (RGBA,
//!   LA, a palette or RGB/L PNG with `tRNS`) is alpha-composited onto opaque white with Pillow's
//!   integer `alpha_composite` (equal to `round(c * a / 255 + 255 - a)`). Plain Pillow
//!   `convert("RGB")` (LAVIS) drops the alpha instead: [`AlphaMode::Drop`].
//! - 16-bit PNGs: Pillow opens grey 16-bit as mode `I;16` and `convert("RGB")` CLIPS each value
//!   to 255 (0, 1, 255, 256, 65535 -> 0, 1, 255, 255, 255); RGB(A) 16-bit and LA 16-bit are
//!   unpacked by keeping the high byte (`v >> 8`, no rounding; LA 16-bit opens as RGBA). The
//!   `image` crate's `to_rgb8` (`v / 257` rounded) is therefore not used.
//! - Resize: Pillow 13 `libImaging/Resample.c` (`precompute_coeffs`, `normalize_coeffs_8bpc`,
//!   `ImagingResampleHorizontal/Vertical_8bpc`, `ImagingResampleInner`'s pass order), 22-bit
//!   fixed-point coefficients, uint8 between passes; see [`pillow_resize_bicubic`].
//! - JPEG is decoded by libjpeg-turbo's C decoder (the `mozjpeg` crate), not by the `image`
//!   crate's zune-jpeg, whose IDCT rounding, chroma upsampling and YCbCr tables differ from
//!   Pillow's by up to 3 levels: greyscale, YCbCr, RGB and CMYK (Adobe-inverted, Pillow's
//!   `cmyk2rgb`) JPEGs, baseline, progressive and arithmetic-coded, decode to Pillow's exact
//!   bytes, and truncated data is an error as in Pillow; see `jpeg.rs`.
//! - Rescale is `(x as f64 * rescale_factor) as f32` (numpy upcasts to float64 then casts to
//!   float32); normalize is `(x - mean) / std` in float32 with float32 mean/std.
//! - EXIF orientation is not applied (Pillow's `Image.open` does not apply it either).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde_json::Value;

use crate::error::{Error, Result};

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// transformers' `OPENAI_CLIP_MEAN` (BLIP's default), rounded f64 -> f32 as numpy does.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [
    CLIP_MEAN[0] as f32,
    CLIP_MEAN[1] as f32,
    CLIP_MEAN[2] as f32,
];
/// transformers' `OPENAI_CLIP_STD` (BLIP's default), rounded f64 -> f32 as numpy does.
pub const OPENAI_CLIP_STD: [f32; 3] = [CLIP_STD[0] as f32, CLIP_STD[1] as f32, CLIP_STD[2] as f32];
/// `BlipImageProcessor`'s default size when a config file has no `size`.
pub const TRANSFORMERS_DEFAULT_SIZE: usize = 384;
/// Pillow's `Image.BICUBIC`, the only `resample` value accepted in a config file.
const PIL_BICUBIC: u64 = 3;

/// Limits applied before and while decoding untrusted image bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest allocation the decoder may make, in bytes (`image::Limits::max_alloc`).
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_width: 16384,
            max_height: 16384,
            max_pixels: 64 * 1024 * 1024,
            max_alloc: 512 * 1024 * 1024,
        }
    }
}

/// What to do with an alpha band when converting to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaMode {
    /// transformers' `convert_to_rgb`: composite onto opaque white (Pillow `alpha_composite`).
    #[default]
    CompositeOnWhite,
    /// Pillow's `Image.convert("RGB")` (LAVIS): the alpha band is dropped.
    Drop,
}

/// The image processor settings of a checkpoint (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub height: usize,
    pub width: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// The model needs RGB input, so images are converted to RGB even when this is false.
    pub do_convert_rgb: bool,
}

impl ImageProcessorConfig {
    /// BLIP's defaults with a square `size x size` output.
    pub fn with_size(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
        }
    }

    /// Reads `preprocessor_config.json`, else the `image_processor` object of
    /// `processor_config.json`, from a checkpoint directory; when neither exists, BLIP's defaults
    /// with a `default_size` square (pass the vision config's `image_size`). Inside a file a
    /// missing `size` means transformers' default, 384.
    pub fn from_dir(dir: &Path, default_size: usize) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let value = read_json(&pre)?;
            return Self::from_json(&value, &pre);
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let value = read_json(&proc)?;
            if let Some(inner) = value.get("image_processor") {
                return Self::from_json(inner, &proc);
            }
        }
        Ok(Self::with_size(default_size))
    }

    fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| err("the image processor config is not a JSON object".into()))?;
        let mut cfg = Self::with_size(TRANSFORMERS_DEFAULT_SIZE);
        if let Some(size) = obj.get("size").filter(|v| !v.is_null()) {
            (cfg.height, cfg.width) = parse_size(size).map_err(err)?;
        }
        for (key, slot) in [
            ("image_mean", &mut cfg.image_mean),
            ("image_std", &mut cfg.image_std),
        ] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                *slot = parse_triple(v).ok_or_else(|| {
                    err(format!("`{key}` must be a number or 3 numbers, got {v}"))
                })?;
            }
        }
        if cfg.image_std.contains(&0.0) {
            return Err(err(format!("`image_std` has a zero: {:?}", cfg.image_std)));
        }
        if let Some(v) = obj.get("rescale_factor").filter(|v| !v.is_null()) {
            cfg.rescale_factor = v
                .as_f64()
                .ok_or_else(|| err(format!("`rescale_factor` must be a number, got {v}")))?;
        }
        for (key, slot) in [
            ("do_resize", &mut cfg.do_resize),
            ("do_rescale", &mut cfg.do_rescale),
            ("do_normalize", &mut cfg.do_normalize),
            ("do_convert_rgb", &mut cfg.do_convert_rgb),
        ] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                *slot = v
                    .as_bool()
                    .ok_or_else(|| err(format!("`{key}` must be a boolean, got {v}")))?;
            }
        }
        if let Some(v) = obj.get("resample").filter(|v| !v.is_null()) {
            if v.as_u64() != Some(PIL_BICUBIC) {
                return Err(err(format!(
                    "`resample` {v} is not supported, only 3 (BICUBIC)"
                )));
            }
        }
        if obj.get("do_center_crop").and_then(Value::as_bool) == Some(true) {
            return Err(err("`do_center_crop` is not supported for BLIP".into()));
        }
        Ok(cfg)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: PathBuf::from(path),
        message: e.to_string(),
    })
}

/// `size`: an int (square), `{"height", "width"}`, or `{"shortest_edge"}`. transformers would
/// resize `shortest_edge` preserving the aspect ratio; the ViT needs a fixed grid, so it is taken
/// as a square here.
fn parse_size(v: &Value) -> std::result::Result<(usize, usize), String> {
    let positive = |x: Option<u64>| x.filter(|&n| n > 0).map(|n| n as usize);
    if let Some(n) = positive(v.as_u64()) {
        return Ok((n, n));
    }
    let field = |k: &str| positive(v.get(k).and_then(Value::as_u64));
    match (field("height"), field("width"), field("shortest_edge")) {
        (Some(h), Some(w), _) => Ok((h, w)),
        (None, None, Some(s)) => Ok((s, s)),
        _ => Err(format!(
            "`size` must be a positive int, {{\"height\", \"width\"}} or {{\"shortest_edge\"}}, got {v}"
        )),
    }
}

fn parse_triple(v: &Value) -> Option<[f32; 3]> {
    if let Some(x) = v.as_f64() {
        return Some([x as f32; 3]);
    }
    let arr = v.as_array().filter(|a| a.len() == 3)?;
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x.as_f64()? as f32;
    }
    Some(out)
}

/// Decodes, converts and resizes images into the vision encoder's `pixel_values`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
    pub limits: DecodeLimits,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig, limits: DecodeLimits) -> Self {
        Self { config, limits }
    }

    /// Decodes PNG / JPEG / WebP / BMP bytes under the limits and converts to RGB the way
    /// transformers does (alpha composited onto white).
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage> {
        self.decode_with_alpha(bytes, AlphaMode::CompositeOnWhite)
    }

    /// [`Self::decode`] with an explicit alpha policy.
    pub fn decode_with_alpha(&self, bytes: &[u8], alpha: AlphaMode) -> Result<RgbImage> {
        Ok(to_rgb_pillow(decode_dynamic(bytes, &self.limits)?, alpha))
    }

    /// Pillow BICUBIC resize to the configured `width x height`.
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        pillow_resize_bicubic(img, self.config.width as u32, self.config.height as u32)
    }

    /// Bytes -> `[3, H, W]` f32 on the CPU.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Tensor> {
        let img = self.decode(bytes)?;
        self.preprocess_rgb(&img)
    }

    /// An RGB image -> `[3, H, W]` f32 on the CPU (the image's own size when `do_resize` is off).
    pub fn preprocess_rgb(&self, img: &RgbImage) -> Result<Tensor> {
        let c = &self.config;
        let size = (u32::try_from(c.width), u32::try_from(c.height));
        let resized;
        let img = match size {
            _ if !c.do_resize => img,
            (Ok(w), Ok(h)) if w > 0 && h > 0 => {
                resized = pillow_resize_bicubic(img, w, h);
                &resized
            }
            _ => {
                let msg = format!("invalid target size {}x{}", c.width, c.height);
                return Err(Error::InvalidInput(msg));
            }
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        let plane = w * h;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in img.pixels().enumerate() {
            for ch in 0..3 {
                let mut v = if c.do_rescale {
                    (f64::from(px.0[ch]) * c.rescale_factor) as f32
                } else {
                    f32::from(px.0[ch])
                };
                if c.do_normalize {
                    v = (v - c.image_mean[ch]) / c.image_std[ch];
                }
                data[ch * plane + i] = v;
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
    }
}

fn image_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Image(format!("{context}: {e}"))
}

/// Decodes under `limits`: the byte size first, then the header's dimensions (before any pixel
/// buffer is allocated), then the decoder's own `image::Limits`. JPEG goes to libjpeg-turbo
/// ([`crate::jpeg`]) with the same header checks.
fn decode_dynamic(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image("empty image (0 bytes)".into()));
    }
    if bytes.len() > limits.max_bytes {
        return Err(Error::Image(format!(
            "encoded image is {} bytes, more than the limit of {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    if crate::jpeg::is_jpeg(bytes) {
        return crate::jpeg::decode(bytes, limits).map(DynamicImage::ImageRgb8);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err("cannot read image", e))?;
    let format = reader.format().ok_or_else(|| {
        Error::Image("unrecognised image format (accepted: PNG, JPEG, WebP, BMP)".into())
    })?;
    if !format.reading_enabled() {
        return Err(Error::Image(format!(
            "unsupported image format {format:?} (accepted: PNG, JPEG, WebP, BMP)"
        )));
    }
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_width);
    lim.max_image_height = Some(limits.max_height);
    lim.max_alloc = Some(limits.max_alloc);
    reader.limits(lim);
    let decoder = reader
        .into_decoder()
        .map_err(|e| image_err(&format!("cannot decode {format:?} header"), e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("image has zero size {w}x{h}")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if w > limits.max_width || h > limits.max_height || pixels > limits.max_pixels {
        return Err(Error::Image(format!(
            "image is {w}x{h} ({pixels} pixels), over the limits {}x{} / {} pixels",
            limits.max_width, limits.max_height, limits.max_pixels
        )));
    }
    if decoder.total_bytes() > limits.max_alloc {
        return Err(Error::Image(format!(
            "decoding {w}x{h} needs {} bytes, over the limit of {}",
            decoder.total_bytes(),
            limits.max_alloc
        )));
    }
    DynamicImage::from_decoder(decoder)
        .map_err(|e| image_err(&format!("cannot decode {format:?}"), e))
}

/// Pillow's `alpha_composite` of `c` with alpha `a` over opaque white (integer, 7-bit
/// precision); equal to `round(c * a / 255 + 255 - a)` for all 65536 pairs.
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    let tmp = (c * a + 255 * (255 - a)) * 128 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// Converts to RGB8 as Pillow (and transformers' `convert_to_rgb`) does; see the module docs.
fn to_rgb_pillow(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
    let blend = |c: u8, a: u8| {
        if alpha == AlphaMode::Drop {
            c
        } else {
            over_white(c, a)
        }
    };
    let rgba = |[r, g, b, a]: [u8; 4]| [blend(r, a), blend(g, a), blend(b, a)];
    let hi = |v: u16| (v >> 8) as u8;
    let (w, h) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(i) => return i,
        DynamicImage::ImageLuma8(i) => i.pixels().flat_map(|p| [p.0[0]; 3]).collect(),
        DynamicImage::ImageLumaA8(i) => i
            .pixels()
            .flat_map(|p| [blend(p.0[0], p.0[1]); 3])
            .collect(),
        DynamicImage::ImageRgba8(i) => i.pixels().flat_map(|p| rgba(p.0)).collect(),
        // Pillow "I;16" -> "RGB" clips to 255.
        DynamicImage::ImageLuma16(i) => i
            .pixels()
            .flat_map(|p| [p.0[0].min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageLumaA16(i) => i
            .pixels()
            .flat_map(|p| [blend(hi(p.0[0]), hi(p.0[1])); 3])
            .collect(),
        DynamicImage::ImageRgb16(i) => i.pixels().flat_map(|p| p.0.map(hi)).collect(),
        DynamicImage::ImageRgba16(i) => i.pixels().flat_map(|p| rgba(p.0.map(hi))).collect(),
        // Float images come from no enabled decoder; fall back to the crate's conversion.
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bicubic_filter` (a = -0.5), same operation order.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index, number of taps, and `ksize` fixed-point coefficients.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for BICUBIC over the box `[0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut kk[xx * ksize..xx * ksize + n];
        for (dst, &kx) in row.iter_mut().zip(&k) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let fixed = kx * f64::from(1u32 << PRECISION_BITS);
            *dst = if kx < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, kk, ksize }
}

/// Pillow's `clip8`: `>> PRECISION_BITS` then clamp to 0..=255.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One horizontal pass (Pillow `ImagingResampleHorizontal_8bpc`) over `rows` rows of `src`
/// (RGB, `in_w` wide) starting at row `first`.
fn pass_horizontal(src: &[u8], in_w: usize, first: usize, rows: usize, co: &Coeffs) -> Vec<u8> {
    let out_w = co.bounds.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows * out_w * 3];
    for (r, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let in_row = &src[(r + first) * in_w * 3..(r + first + 1) * in_w * 3];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = co.bounds[xx];
            let mut ss = [half; 3];
            let taps = in_row[xmin * 3..(xmin + n) * 3].chunks_exact(3);
            for (p, &kx) in taps.zip(&co.kk[xx * co.ksize..xx * co.ksize + n]) {
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * kx;
                }
            }
            for c in 0..3 {
                px[c] = clip8(ss[c]);
            }
        }
    }
    out
}

/// One vertical pass (Pillow `ImagingResampleVertical_8bpc`) over `src` (RGB, `w` wide) whose
/// first row is source row `first`.
fn pass_vertical(src: &[u8], w: usize, first: usize, co: &Coeffs) -> Vec<u8> {
    let stride = w * 3;
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; co.bounds.len() * stride];
    let mut ss = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, n) = co.bounds[yy];
        ss.fill(half);
        for (y, &ky) in co.kk[yy * co.ksize..yy * co.ksize + n].iter().enumerate() {
            let row = ymin + y - first;
            for (s, &p) in ss.iter_mut().zip(&src[row * stride..(row + 1) * stride]) {
                *s += i32::from(p) * ky;
            }
        }
        for (o, &s) in out_row.iter_mut().zip(&ss) {
            *o = clip8(s);
        }
    }
    out
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit-exact
/// (Pillow 13 `ImagingResampleInner`): two fixed-point separable passes, each skipped when that
/// dimension is unchanged. The horizontal pass runs first (over only the rows the vertical pass
/// reads) unless the height shrinks by more than twice as many pixels as the width does; the
/// order changes the uint8 rounding between passes, so it matters for exactness.
pub fn pillow_resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    let src = img.as_raw();
    let out = match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => pass_horizontal(src, in_w, 0, in_h, &precompute_coeffs(in_w, out_w)),
        (false, true) => pass_vertical(src, in_w, 0, &precompute_coeffs(in_h, out_h)),
        (true, true) if horizontal_first => {
            let vert = precompute_coeffs(in_h, out_h);
            let first = vert.bounds[0].0;
            let (lmin, ln) = vert.bounds[out_h - 1];
            let rows = (lmin + ln).saturating_sub(first);
            let tmp = pass_horizontal(src, in_w, first, rows, &precompute_coeffs(in_w, out_w));
            pass_vertical(&tmp, out_w, first, &vert)
        }
        (true, true) => {
            let tmp = pass_vertical(src, in_w, 0, &precompute_coeffs(in_h, out_h));
            pass_horizontal(&tmp, in_w, 0, out_h, &precompute_coeffs(in_w, out_w))
        }
    };
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = [x * 7 + y * 13, x * 3 + y * 5 + 40, (x ^ y) * 11];
            image::Rgb(v.map(|v| (v % 256) as u8))
        })
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn proc(size: usize) -> ImageProcessor {
        ImageProcessor::new(
            ImageProcessorConfig::with_size(size),
            DecodeLimits::default(),
        )
    }

    /// Pillow 13.0.0 `Image.fromarray(synth(w, h)).resize((ow, oh), Image.BICUBIC)`: FNV-1a of
    /// the output bytes and its first 8 bytes.
    #[test]
    fn resize_matches_pillow_goldens() {
        #[rustfmt::skip]
        let cases: [(u32, u32, u32, u32, u64, [u8; 8]); 9] = [
            (37, 23, 16, 16, 0x4a57463c16332ada, [8, 43, 8, 23, 50, 32, 40, 57]),
            (37, 23, 64, 50, 0xa4195d43e4df04c0, [0, 40, 0, 1, 41, 3, 6, 43]),
            (37, 23, 5, 40, 0x2a2ff9b850a3e085, [23, 50, 37, 72, 71, 115, 125, 94]),
            (50, 200, 32, 32, 0x3119b4a5ba953cb8, [38, 55, 30, 49, 59, 32, 60, 64]), // vertical first
            (40, 300, 30, 20, 0x40106f5c04eac4bd, [106, 78, 92, 113, 81, 92, 121, 85]), // vertical first
            (61, 61, 28, 28, 0xf3dbd0cec2b627c9, [12, 45, 9, 27, 51, 28, 43, 58]),
            (1, 9, 28, 28, 0x3e67b8d19bb0f605, [0, 39, 0, 0, 39, 0, 0, 39]),
            (300, 1, 42, 3, 0x7845dadc5819fd64, [23, 50, 36, 70, 70, 111, 121, 92]),
            (97, 61, 364, 224, 0x167beba9c67cf87b, [0, 39, 0, 0, 39, 0, 0, 39]),
        ];
        for (w, h, ow, oh, hash, head) in cases {
            let out = pillow_resize_bicubic(&synth(w, h), ow, oh).into_raw();
            let fnv = |h: u64, &b: &u8| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            assert_eq!(out.len(), (ow * oh * 3) as usize);
            assert_eq!(
                (&out[..8], out.iter().fold(0xcbf2_9ce4_8422_2325, fnv)),
                (&head[..], hash)
            );
        }
        assert_eq!(pillow_resize_bicubic(&synth(13, 7), 13, 7), synth(13, 7));
    }

    #[test]
    fn rgb_conversion_follows_pillow() {
        for (a, c) in (0..=255u32).flat_map(|a| (0..=255u32).map(move |c| (a, c))) {
            let want = (f64::from(c * a) / 255.0 + f64::from(255 - a)).round() as u8;
            assert_eq!(over_white(c as u8, a as u8), want, "c={c} a={a}");
        }
        let p = proc(4);
        let vals = [0u16, 1, 255, 256, 65535]; // I;16 -> RGB clips at 255
        let g16 = image::ImageBuffer::from_fn(5, 1, |x, _| image::Luma([vals[x as usize]]));
        let rgb = p.decode(&png(DynamicImage::ImageLuma16(g16))).unwrap();
        assert_eq!(
            rgb.pixels().map(|px| px.0[0]).collect::<Vec<_>>(),
            [0, 1, 255, 255, 255]
        );
        let c16 = image::ImageBuffer::from_pixel(2, 1, image::Rgb([0x80ff, 0x7f80, 0x00ff]));
        let rgb = p.decode(&png(DynamicImage::ImageRgb16(c16))).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [0x80, 0x7f, 0x00]); // RGB 16-bit: high byte
        let rgba = image::RgbaImage::from_pixel(1, 1, image::Rgba([200, 10, 0, 128]));
        let bytes = png(DynamicImage::ImageRgba8(rgba));
        assert_eq!(p.decode(&bytes).unwrap().get_pixel(0, 0).0, [227, 132, 127]);
        let dropped = p.decode_with_alpha(&bytes, AlphaMode::Drop).unwrap();
        assert_eq!(dropped.get_pixel(0, 0).0, [200, 10, 0]);
    }

    #[test]
    fn preprocess_rescales_then_normalizes_in_f32() {
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([255 * x as u8, 128, 7]));
        let mut p = proc(2);
        p.config.height = 1;
        let t = p.preprocess_rgb(&img).unwrap();
        assert_eq!(t.dims(), [3, 1, 2]);
        let f = |x: u8, c: usize| {
            ((f64::from(x) / 255.0) as f32 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
        };
        let want = [f(0, 0), f(255, 0), f(128, 1), f(128, 1), f(7, 2), f(7, 2)];
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(OPENAI_CLIP_STD[1], 0.261_302_6); // 0.26130258 rounded once to f32
    }

    #[test]
    fn config_from_dir() {
        let dir = std::env::temp_dir().join(format!("blip2-processor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = || ImageProcessorConfig::from_dir(&dir, 224);
        assert_eq!(load().unwrap(), ImageProcessorConfig::with_size(224));
        let json = r#"{"image_processor": {"size": {"height": 32, "width": 48}, "image_mean": 0.5, "do_normalize": false}}"#;
        std::fs::write(dir.join("processor_config.json"), json).unwrap();
        let c = load().unwrap();
        assert_eq!(
            (c.height, c.width, c.image_mean, c.do_normalize),
            (32, 48, [0.5; 3], false)
        );
        let pre = dir.join("preprocessor_config.json");
        for (json, size) in [
            (r#"{"size": 30}"#, 30),
            (r#"{"size": {"shortest_edge": 20}}"#, 20),
            ("{}", 384),
        ] {
            std::fs::write(&pre, json).unwrap();
            assert_eq!(
                (load().unwrap().height, load().unwrap().width),
                (size, size),
                "{json}"
            );
        }
        for bad in [
            r#"{"size": {"longest_edge": 5}}"#,
            r#"{"image_std": [1, 2]}"#,
            r#"{"resample": 2}"#,
            "{",
        ] {
            std::fs::write(&pre, bad).unwrap();
            assert!(matches!(load(), Err(Error::Config { .. })), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_input_is_an_image_error() {
        let p = proc(8);
        let good = png(DynamicImage::ImageRgb8(synth(40, 30)));
        // A valid PNG signature + IHDR (correct CRC) claiming 100000 x 100000 RGB8.
        let ihdr = [
            &b"IHDR"[..],
            &100_000u32.to_be_bytes(),
            &100_000u32.to_be_bytes(),
            &[8, 2, 0, 0, 0],
        ]
        .concat();
        let crc = ihdr.iter().fold(!0u32, |c, &b| {
            (0..8).fold(c ^ u32::from(b), |c, _| {
                if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                }
            })
        });
        let huge_png = [
            &b"\x89PNG\r\n\x1a\n\0\0\0\x0d"[..],
            &ihdr,
            &(!crc).to_be_bytes(),
            &[0; 16],
        ]
        .concat();
        // BITMAPFILEHEADER + BITMAPINFOHEADER claiming 100000 x 100000 at 24 bpp.
        let dims = [100_000i32.to_le_bytes(), 100_000i32.to_le_bytes()].concat();
        let bmp = [
            &b"BM"[..],
            &[70, 0, 0, 0, 0, 0, 0, 0, 54, 0, 0, 0, 40, 0, 0, 0],
            &dims,
            &[1, 0, 24, 0],
            &[0; 40],
        ]
        .concat();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let cases: [(&str, &[u8]); 6] = [
            ("zero bytes", &[]),
            ("truncated png", &good[..good.len() / 2]),
            ("png signature only", &good[..20]),
            ("random bytes", &random),
            ("png claiming 100000x100000", &huge_png),
            ("bmp claiming 100000x100000", &bmp),
        ];
        for (name, bytes) in cases {
            match p.preprocess(bytes) {
                Err(Error::Image(msg)) => eprintln!("{name}: {msg}"),
                other => panic!("{name}: expected Error::Image, got {other:?}"),
            }
        }
        for limits in [
            DecodeLimits {
                max_pixels: 100,
                ..Default::default()
            },
            DecodeLimits {
                max_bytes: 10,
                ..Default::default()
            },
        ] {
            let p = ImageProcessor::new(ImageProcessorConfig::with_size(8), limits);
            assert!(matches!(p.decode(&good), Err(Error::Image(_))));
        }
        assert_eq!(p.preprocess(&good).unwrap().dims(), [3, 8, 8]);
    }

    fn unhex(hex: &str) -> Vec<u8> {
        let digits: Vec<u8> = hex
            .bytes()
            .filter(u8::is_ascii_hexdigit)
            .map(|d| char::from(d).to_digit(16).unwrap() as u8)
            .collect();
        digits.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect()
    }

    /// Pillow 13.0.0: `Image.fromarray(a).save(f, "JPEG", quality=90, subsampling=2,
    /// optimize=True)` of a 16x8 RGB pattern (4:2:0), then `Image.open(f).convert("RGB")`.
    const JPEG_420: &str = "\
        ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404\
        050a070706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ff\
        db00430103040405040509050509140d0b0d141414141414141414141414141414141414141414141414141414\
        1414141414141414141414141414141414141414141414ffc00011080008001003012200021101031101ffc400\
        1500010100000000000000000000000000000007ffc40026100000040405050100000000000000000001020311\
        0405061300071421310812415161a1ffc4001501010100000000000000000000000000000506ffc40023110001\
        030400070100000000000000000001020311040512210006223132416162ffda000c03010002110311003f009c\
        e53c8297a4f477a670ab5de34ceb5b66e6d81b97f2df9b5b7396692097f4e957161e5b1d191a1a504cd68a9a6a\
        8845a2c2e2611737b12bfceed85860ebc3469ef48650b38b4f329409f1cdc21447eba744ce324084c013d79b82\
        69b99e96969e9db400eb7b09927683bc891dcfa03ecf1fffd9";
    const JPEG_420_RGB: &str = "\
        0922021032171144351e5a58235e7033738f3d82a34695a255af953ea35551bb3761d43b68e45e8cd59d461c70\
        7512ab232a182b382637533d2f524b4b7188447093548aa45d9b985199677aca7170c44b75d04d74de64a1d7a3\
        6e30798f169f472732593d395541206558456a6689777fad6f859082a07c83a74794bb48aad27196c76caeef91\
        d7e7ba841d54b4117a712d5477364e7f3e3c8b4f4e986b82a180959f8c7e9f9c659eab429cb6489ebe73b6e3a0\
        b6f49edfeeb7922f4cc62a73912b6ca43b7eb94b94c65c8ab0584cb96c42c58056c49b63b2b96ca7d283a5e6ae\
        adffbdb0ffa7c0f4a178464756001da73894ad3b9ac851b5cb639eb87354b8863dcca057bdac67afcb9150915b\
        4fac7550c06e49c2418fdc762810104e0437a446beb95dc8b760afa975994852393a6820346d064184254b986a\
        53b18c40b46b4dd06053e1416cc9574c354f5104625f098e6616856d266c5f435a34654f24843c28941d2d9d2f\
        4ab0894ab79851cf7e4fdc5a58f04380e36c311c4375269b";
    /// Pillow 13.0.0: the top-left 4x2 of that pattern `.convert("CMYK")` saved as JPEG (Adobe
    /// marker, inverted CMYK), then `Image.open(f).convert("RGB")` (`CMYK;I` + `cmyk2rgb`).
    const JPEG_CMYK: &str = "\
        ffd8ffee000e41646f626500640000000000ffdb00430002010101010102010101020202020204030202020205\
        04040304060506060605060606070908060709070606080b08090a0a0a0a0a06080b0c0b0a0c090a0a0affc000\
        140800020004044311004d11005911004b1100ffc4001500010100000000000000000000000000000908ffc400\
        2a1000010203020f0000000000000000000001020500030406071112141521263137415161628194b1ffda000e\
        0443004d0059004b00003f0031ac6589b199824ea8b5fa12fa76c45f715bb8a2f3f041a3732e8e6d3748c74ed4\
        e33e9a59cbf0a29e72900e2b8d5213a01e084a52390481b0087f23ffd9";
    const JPEG_CMYK_RGB: &str = "00280007381e0e483b15585527281b2e38003548563c5839";

    #[test]
    fn jpeg_decodes_like_pillow() {
        let p = proc(8);
        let cases = [
            (JPEG_420, JPEG_420_RGB, (16, 8)),
            (JPEG_CMYK, JPEG_CMYK_RGB, (4, 2)),
        ];
        for (jpeg, rgb, size) in cases {
            let img = p.decode(&unhex(jpeg)).unwrap();
            assert_eq!(img.dimensions(), size);
            assert_eq!(img.as_raw(), &unhex(rgb));
        }
    }

    /// Each case fails in Pillow too (`Image.open(f).convert("RGB")` raises).
    #[test]
    fn bad_jpeg_is_an_image_error() {
        let p = proc(8);
        let good = unhex(JPEG_420);
        let sof = good.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut huge = good.clone();
        huge[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]); // 65500 x 65500
        let mut twelve_bit = good.clone();
        twelve_bit[sof + 4] = 12;
        let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let mut bad_huffman = good.clone();
        bad_huffman[sos - 20..sos].fill(0xEE); // inside the last DHT segment
        let mut garbage = good[..sof].to_vec();
        garbage.extend((0..200u32).map(|i| (i * 37 + 11) as u8));
        let cases: [(&str, &[u8]); 10] = [
            ("jpeg SOI only", &good[..3]),
            ("jpeg headers without a scan", &good[..sos]),
            ("jpeg cut inside a table", &good[..good.len() / 3]),
            ("jpeg cut in the scan", &good[..good.len() - 40]),
            ("jpeg without its EOI marker", &good[..good.len() - 2]),
            ("12-bit jpeg", &twelve_bit),
            ("jpeg with a bad huffman table", &bad_huffman),
            ("jpeg with garbage after the tables", &garbage),
            ("jpeg claiming 65500x65500", &huge),
            (
                "jpeg-like random bytes",
                &[0xFF, 0xD8, 0xFF, 0x00, 0x13, 0x37],
            ),
        ];
        for (name, bytes) in cases {
            match p.preprocess(bytes) {
                Err(Error::Image(msg)) => eprintln!("{name}: {msg}"),
                other => panic!("{name}: expected Error::Image, got {other:?}"),
            }
        }
        let Err(Error::Image(msg)) = p.decode(&huge) else {
            panic!("huge jpeg decoded")
        };
        assert!(msg.contains("over the limits"), "{msg}");
        let small = DecodeLimits {
            max_pixels: 100, // 16 x 8 = 128
            ..Default::default()
        };
        let p = ImageProcessor::new(ImageProcessorConfig::with_size(8), small);
        assert!(matches!(p.decode(&good), Err(Error::Image(_))));
    }

    /// `preprocess` vs transformers' `BlipImageProcessorPil` goldens (tools/fixtures/generate.py):
    /// every image, JPEG included, must be bit-exact.
    #[test]
    fn preprocess_matches_transformers_goldens() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let Ok(entries) = std::fs::read_dir(root.join("goldens")) else {
            return eprintln!("skipping: no fixtures at {}", root.display());
        };
        let mut checked = 0;
        for dir in entries.map(|e| e.unwrap().path()) {
            let Ok(goldens) =
                candle_core::safetensors::load(dir.join("pixels.safetensors"), &Device::Cpu)
            else {
                continue;
            };
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            for (file, want) in goldens {
                let (_, h, w) = want.dims3().unwrap();
                let config =
                    ImageProcessorConfig::from_dir(&root.join("models").join(&name), h).unwrap();
                assert_eq!((config.height, config.width), (h, w), "{name}: config size");
                let bytes = std::fs::read(root.join("images").join(&file)).unwrap();
                let got = ImageProcessor::new(config, DecodeLimits::default())
                    .preprocess(&bytes)
                    .unwrap();
                let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
                let (got, want) = (
                    got.to_vec1::<f32>().unwrap(),
                    want.to_vec1::<f32>().unwrap(),
                );
                assert_eq!(got.len(), want.len());
                let max = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let same =
                    got.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / got.len() as f64;
                eprintln!("{name}/{file}: identical share {same:.6}, max abs diff {max:.6}");
                assert!(
                    max <= 0.015 && same == 1.0,
                    "{name}/{file}: not bit-exact, max {max}"
                );
                checked += 1;
            }
        }
        eprintln!("checked {checked} golden images");
    }
}
