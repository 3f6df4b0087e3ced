//! The cut between tiers: a soft prompt `[num_query_tokens, llm_hidden]` as raw little-endian
//! bytes with dtype and shape, the image's sha256 and the checkpoint fingerprint.

use blip2_proto::v1::{Dtype as WireDType, SoftPrompt};
use candle_core::{DType, Device, Tensor};
use sha2::Digest;

/// Why a soft prompt cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum SoftPromptError {
    #[error("soft prompt has an unspecified or unknown dtype")]
    DType,
    #[error("soft prompt shape {shape:?} with dtype {dtype} needs {expected} bytes, got {got}")]
    Size {
        shape: Vec<u32>,
        dtype: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("soft prompt has shape {got:?}, this checkpoint expects {expected:?}")]
    Shape { got: Vec<u32>, expected: Vec<u32> },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn wire_dtype(dtype: DType) -> WireDType {
    match dtype {
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::Bf16,
        _ => WireDType::F32,
    }
}

pub fn candle_dtype(dtype: WireDType) -> Option<DType> {
    match dtype {
        WireDType::F32 => Some(DType::F32),
        WireDType::F16 => Some(DType::F16),
        WireDType::Bf16 => Some(DType::BF16),
        WireDType::Unspecified => None,
    }
}

/// Encodes a soft prompt `[num_query_tokens, hidden]` in `dtype` for the wire.
pub fn encode_2d(
    tensor: &Tensor,
    dtype: DType,
    image_sha256: &str,
    checkpoint_fingerprint: &str,
) -> Result<SoftPrompt, SoftPromptError> {
    let (q, h) = tensor.dims2()?;
    let flat = tensor.to_dtype(dtype)?.flatten_all()?;
    let data: Vec<u8> = match dtype {
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    Ok(SoftPrompt {
        data,
        dtype: wire_dtype(dtype) as i32,
        shape: vec![q as u32, h as u32],
        image_sha256: image_sha256.to_string(),
        checkpoint_fingerprint: checkpoint_fingerprint.to_string(),
    })
}

/// Decodes a soft prompt into a tensor of its wire dtype, checking size and expected shape.
pub fn decode(
    prompt: &SoftPrompt,
    expected_shape: [usize; 2],
    device: &Device,
) -> Result<Tensor, SoftPromptError> {
    let wire = WireDType::try_from(prompt.dtype).map_err(|_| SoftPromptError::DType)?;
    let dtype = candle_dtype(wire).ok_or(SoftPromptError::DType)?;
    let expected: Vec<u32> = expected_shape.iter().map(|&d| d as u32).collect();
    if prompt.shape != expected {
        return Err(SoftPromptError::Shape {
            got: prompt.shape.clone(),
            expected,
        });
    }
    let count = expected_shape[0] * expected_shape[1];
    let width = dtype.size_in_bytes();
    if prompt.data.len() != count * width {
        return Err(SoftPromptError::Size {
            shape: prompt.shape.clone(),
            dtype: dtype.as_str(),
            expected: count * width,
            got: prompt.data.len(),
        });
    }
    let tensor = match dtype {
        DType::F16 => {
            let v: Vec<half::f16> = prompt
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, (expected_shape[0], expected_shape[1]), device)?
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = prompt
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, (expected_shape[0], expected_shape[1]), device)?
        }
        _ => {
            let v: Vec<f32> = prompt
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, (expected_shape[0], expected_shape[1]), device)?
        }
    };
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        let t = Tensor::new(&[[1.5f32, -2.25, 3.0], [0.5, 0.0, -1.0]], &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let wire = encode_2d(&t, dtype, "abc", "fp").unwrap();
            assert_eq!(wire.shape, vec![2, 3]);
            assert_eq!(wire.data.len(), 6 * dtype.size_in_bytes());
            let back = decode(&wire, [2, 3], &Device::Cpu).unwrap();
            assert_eq!(back.dtype(), dtype);
            let v: Vec<Vec<f32>> = back.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
            assert_eq!(v, vec![vec![1.5, -2.25, 3.0], vec![0.5, 0.0, -1.0]]);
        }
    }

    #[test]
    fn refuses_wrong_shape_and_size() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut wire = encode_2d(&t, DType::F32, "abc", "fp").unwrap();
        assert!(matches!(
            decode(&wire, [3, 2], &Device::Cpu),
            Err(SoftPromptError::Shape { .. })
        ));
        wire.data.pop();
        assert!(matches!(
            decode(&wire, [2, 3], &Device::Cpu),
            Err(SoftPromptError::Size { .. })
        ));
        wire.dtype = 0;
        assert!(matches!(
            decode(&wire, [2, 3], &Device::Cpu),
            Err(SoftPromptError::DType)
        ));
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
