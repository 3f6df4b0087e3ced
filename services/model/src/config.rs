//! `config.json` of a BLIP-2 checkpoint, deserialized as is.
//!
//! Field names are transformers' (`Blip2Config`, `Blip2VisionConfig`, `Blip2QFormerConfig`,
//! `OPTConfig`, `T5Config`); every field a sparse config may omit takes the reference default
//! (transformers 5.x `configuration_blip_2.py`, `configuration_opt.py`, `configuration_t5.py`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Activation functions named by `hidden_act` / `activation_function` / `dense_act_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact GELU (erf), transformers' "gelu".
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation: "gelu_new", "gelu_pytorch_tanh", "gelu_fast".
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    #[serde(rename = "gelu_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(alias = "swish")]
    #[serde(rename = "silu")]
    Silu,
}

impl Activation {
    /// Parses a transformers activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }

    pub fn forward(self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Silu => xs.silu(),
        }
    }
}

/// `Blip2VisionConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "default_vision_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_vision_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_vision_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_vision_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "default_vision_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
}

fn default_vision_hidden_size() -> usize {
    1408
}
fn default_vision_intermediate_size() -> usize {
    6144
}
fn default_vision_num_hidden_layers() -> usize {
    39
}
fn default_vision_num_attention_heads() -> usize {
    16
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    14
}
fn default_num_channels() -> usize {
    3
}
fn default_gelu() -> Activation {
    Activation::Gelu
}
fn default_vision_layer_norm_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// `Blip2QFormerConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct QFormerConfig {
    #[serde(default = "default_qformer_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_qformer_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_qformer_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_qformer_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_qformer_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "default_qformer_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_qformer_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_cross_attention_frequency")]
    pub cross_attention_frequency: usize,
    /// Width of the image features the cross-attention reads; `Blip2Config` overwrites it with
    /// the vision hidden size.
    #[serde(default = "default_vision_hidden_size")]
    pub encoder_hidden_size: usize,
    #[serde(default)]
    pub use_qformer_text_input: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_qformer_vocab_size() -> usize {
    30522
}
fn default_qformer_hidden_size() -> usize {
    768
}
fn default_qformer_num_hidden_layers() -> usize {
    12
}
fn default_qformer_num_attention_heads() -> usize {
    12
}
fn default_qformer_intermediate_size() -> usize {
    3072
}
fn default_qformer_max_position_embeddings() -> usize {
    512
}
fn default_qformer_layer_norm_eps() -> f64 {
    1e-12
}
fn default_cross_attention_frequency() -> usize {
    2
}

/// `OPTConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    #[serde(default = "default_opt_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_opt_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_opt_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_opt_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_opt_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_opt_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_true")]
    pub do_layer_norm_before: bool,
    /// Defaults to `hidden_size`; when different, project_in / project_out exist.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub enable_bias: bool,
    #[serde(default = "default_true")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "default_relu")]
    pub activation_function: Activation,
    #[serde(default = "default_opt_pad")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_opt_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_opt_eos")]
    pub eos_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_opt_vocab_size() -> usize {
    50272
}
fn default_opt_hidden_size() -> usize {
    768
}
fn default_opt_num_hidden_layers() -> usize {
    12
}
fn default_opt_ffn_dim() -> usize {
    3072
}
fn default_opt_num_attention_heads() -> usize {
    12
}
fn default_opt_max_position_embeddings() -> usize {
    2048
}
fn default_relu() -> Activation {
    Activation::Relu
}
fn default_opt_pad() -> Option<u32> {
    Some(1)
}
fn default_opt_bos() -> Option<u32> {
    Some(2)
}
fn default_opt_eos() -> Option<u32> {
    Some(2)
}

impl OptConfig {
    pub fn word_embed_proj_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
}

/// `T5Config` as the BLIP-2 Flan-T5 checkpoints write it.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    #[serde(default = "default_t5_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_t5_d_model")]
    pub d_model: usize,
    #[serde(default = "default_t5_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_t5_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_t5_num_layers")]
    pub num_layers: usize,
    /// Defaults to `num_layers`.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    #[serde(default = "default_t5_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_t5_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_t5_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_t5_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_t5_ff_proj")]
    pub feed_forward_proj: String,
    /// When absent, derived from `feed_forward_proj` as T5Config does.
    #[serde(default)]
    pub dense_act_fn: Option<String>,
    #[serde(default)]
    pub is_gated_act: Option<bool>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Whether the decoder output is scaled by `d_model^-0.5` before `lm_head`. transformers 5.x
    /// derives it from `tie_word_embeddings` (then forces that to true) and writes it to the
    /// config.json files it saves; when absent, it follows `tie_word_embeddings`.
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default = "default_t5_pad")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_t5_eos")]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default = "default_t5_n_positions")]
    pub n_positions: usize,
}

fn default_t5_vocab_size() -> usize {
    32128
}
fn default_t5_d_model() -> usize {
    512
}
fn default_t5_d_kv() -> usize {
    64
}
fn default_t5_d_ff() -> usize {
    2048
}
fn default_t5_num_layers() -> usize {
    6
}
fn default_t5_num_heads() -> usize {
    8
}
fn default_t5_buckets() -> usize {
    32
}
fn default_t5_max_distance() -> usize {
    128
}
fn default_t5_eps() -> f64 {
    1e-6
}
fn default_t5_ff_proj() -> String {
    "relu".to_string()
}
fn default_t5_pad() -> Option<u32> {
    Some(0)
}
fn default_t5_eos() -> Option<u32> {
    Some(1)
}
fn default_t5_n_positions() -> usize {
    512
}

impl T5Config {
    pub fn num_decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Whether the FFN is gated (`wi_0`, `wi_1`), as T5Config derives it.
    pub fn is_gated_act(&self) -> bool {
        self.is_gated_act
            .unwrap_or_else(|| self.feed_forward_proj.starts_with("gated-"))
    }

    /// The FFN activation: `dense_act_fn` when config.json names it (the BLIP-2 checkpoints say
    /// "gelu", exact), else derived from `feed_forward_proj` ("gated-gelu" means tanh GELU).
    pub fn activation(&self) -> Result<Activation> {
        let name = match &self.dense_act_fn {
            Some(name) => name.clone(),
            None if self.feed_forward_proj == "gated-gelu" => "gelu_new".to_string(),
            None => self
                .feed_forward_proj
                .rsplit('-')
                .next()
                .unwrap_or("relu")
                .to_string(),
        };
        Activation::from_name(&name).ok_or_else(|| Error::Config {
            path: "config.json".into(),
            message: format!("text_config: unsupported activation `{name}`"),
        })
    }

    /// `T5Config.scale_decoder_outputs` as transformers 5.x resolves it.
    pub fn scale_decoder_outputs(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    pub fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start_token_id
            .or(self.pad_token_id)
            .unwrap_or(0)
    }
}

/// The language model's configuration, by `model_type`.
#[derive(Debug, Clone)]
pub enum TextConfig {
    Opt(OptConfig),
    T5(T5Config),
}

impl TextConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.hidden_size,
            TextConfig::T5(c) => c.d_model,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.vocab_size,
            TextConfig::T5(c) => c.vocab_size,
        }
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            TextConfig::Opt(_) => "opt",
            TextConfig::T5(_) => "t5",
        }
    }

    fn from_value(value: Option<serde_json::Value>, path: &Path) -> Result<Self> {
        let value = value.unwrap_or_else(|| serde_json::json!({}));
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("opt")
            .to_string();
        let bad = |e: serde_json::Error| Error::Config {
            path: path.to_path_buf(),
            message: format!("text_config: {e}"),
        };
        match model_type.as_str() {
            "opt" => Ok(TextConfig::Opt(serde_json::from_value(value).map_err(bad)?)),
            "t5" | "mt5" => Ok(TextConfig::T5(serde_json::from_value(value).map_err(bad)?)),
            other => Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "text_config.model_type `{other}` is not supported (expected \"opt\" or \"t5\")"
                ),
            }),
        }
    }
}

#[derive(Deserialize)]
struct RawBlip2Config {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    vision_config: Option<serde_json::Value>,
    #[serde(default)]
    qformer_config: Option<serde_json::Value>,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    #[serde(default = "default_num_query_tokens")]
    num_query_tokens: usize,
    #[serde(default)]
    image_token_index: Option<u32>,
    #[serde(default)]
    image_text_hidden_size: Option<usize>,
}

fn default_num_query_tokens() -> usize {
    32
}

/// `Blip2Config`.
#[derive(Debug, Clone)]
pub struct Blip2Config {
    pub vision_config: VisionConfig,
    pub qformer_config: QFormerConfig,
    pub text_config: TextConfig,
    pub num_query_tokens: usize,
    /// The `<image>` token id; older configs have none (the soft prompt is then prepended).
    pub image_token_index: Option<u32>,
    /// Width of the ITC embedding space (retrieval checkpoints).
    pub image_text_hidden_size: usize,
}

fn default_image_text_hidden_size() -> usize {
    256
}

impl Blip2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawBlip2Config = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(model_type) = &raw.model_type {
            if model_type != "blip-2" && model_type != "blip_2" {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "model_type `{model_type}` is not a BLIP-2 config (\"blip-2\")"
                    ),
                });
            }
        }
        let sub = |name: &str, value: Option<serde_json::Value>| -> Result<serde_json::Value> {
            let value = value.unwrap_or_else(|| serde_json::json!({}));
            if !value.is_object() {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!("{name} must be an object"),
                });
            }
            Ok(value)
        };
        let vision_config: VisionConfig =
            serde_json::from_value(sub("vision_config", raw.vision_config)?).map_err(|e| {
                Error::Config {
                    path: path.to_path_buf(),
                    message: format!("vision_config: {e}"),
                }
            })?;
        let mut qformer_config: QFormerConfig =
            serde_json::from_value(sub("qformer_config", raw.qformer_config)?).map_err(|e| {
                Error::Config {
                    path: path.to_path_buf(),
                    message: format!("qformer_config: {e}"),
                }
            })?;
        // Blip2Config.__init__ overwrites it with the vision width.
        qformer_config.encoder_hidden_size = vision_config.hidden_size;
        let text_config = TextConfig::from_value(raw.text_config, path)?;
        let config = Blip2Config {
            vision_config,
            qformer_config,
            text_config,
            num_query_tokens: raw.num_query_tokens,
            image_token_index: raw.image_token_index,
            image_text_hidden_size: raw
                .image_text_hidden_size
                .unwrap_or_else(default_image_text_hidden_size),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        let v = &self.vision_config;
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return fail(format!(
                "vision_config: image_size {} and patch_size {} do not fit",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return fail(format!(
                "vision_config: hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        let q = &self.qformer_config;
        if q.num_attention_heads == 0 || !q.hidden_size.is_multiple_of(q.num_attention_heads) {
            return fail(format!(
                "qformer_config: hidden_size {} is not divisible by num_attention_heads {}",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if q.cross_attention_frequency == 0 {
            return fail("qformer_config: cross_attention_frequency must be at least 1".into());
        }
        if self.num_query_tokens == 0 {
            return fail("num_query_tokens must be at least 1".into());
        }
        match &self.text_config {
            TextConfig::Opt(c) => {
                if c.num_attention_heads == 0
                    || !c.hidden_size.is_multiple_of(c.num_attention_heads)
                {
                    return fail(format!(
                        "text_config: hidden_size {} is not divisible by num_attention_heads {}",
                        c.hidden_size, c.num_attention_heads
                    ));
                }
            }
            TextConfig::T5(c) => {
                c.activation()?;
                if c.num_heads == 0 || c.relative_attention_num_buckets < 2 {
                    return fail("text_config: num_heads and relative_attention_num_buckets must be positive".into());
                }
            }
        }
        Ok(())
    }

    /// Whether the language model is decoder-only (OPT) rather than encoder-decoder (T5).
    pub fn is_decoder_only(&self) -> bool {
        matches!(self.text_config, TextConfig::Opt(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_config_takes_reference_defaults() {
        let cfg = Blip2Config::from_json(
            r#"{"model_type":"blip-2","text_config":{"model_type":"opt","hidden_size":2560,"num_attention_heads":32}}"#,
            Path::new("config.json"),
        )
        .unwrap();
        assert_eq!(cfg.vision_config.hidden_size, 1408);
        assert_eq!(cfg.vision_config.num_hidden_layers, 39);
        assert_eq!(cfg.qformer_config.encoder_hidden_size, 1408);
        assert_eq!(cfg.qformer_config.cross_attention_frequency, 2);
        assert_eq!(cfg.num_query_tokens, 32);
        assert_eq!(cfg.text_config.hidden_size(), 2560);
        assert!(cfg.is_decoder_only());
    }

    #[test]
    fn t5_activation_follows_dense_act_fn() {
        let cfg = Blip2Config::from_json(
            r#"{"text_config":{"model_type":"t5","feed_forward_proj":"gated-gelu","dense_act_fn":"gelu"}}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let TextConfig::T5(t5) = &cfg.text_config else {
            panic!("expected t5")
        };
        assert_eq!(t5.activation().unwrap(), Activation::Gelu);
        assert!(t5.is_gated_act());
        let derived: T5Config =
            serde_json::from_str(r#"{"feed_forward_proj":"gated-gelu"}"#).unwrap();
        assert_eq!(derived.activation().unwrap(), Activation::GeluTanh);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let err = Blip2Config::from_json(
            r#"{"text_config":{"model_type":"llama"}}"#,
            Path::new("/ckpt/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/ckpt/config.json") && err.contains("llama"),
            "{err}"
        );
    }
}
