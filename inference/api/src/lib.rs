//! The HTTP API of `sd35-server`: what a client sends and gets back, and what the server
//! accepts.
//!
//! - [`parse`]: strict parsing of a JSON body (one JSON object, no unknown fields, no
//!   trailing bytes);
//! - [`sampling`]: the fields every generation body shares and their validation into the
//!   per-image [`params::GenParams`];
//! - [`request`], [`openai`], [`edit_form`], [`sdapi`]: the bodies of the `/v1` routes, the
//!   OpenAI routes (`/v1/images/generations`, the `/v1/images/edits` form) and the
//!   AUTOMATIC1111 subset (`/sdapi/v1/...`);
//! - [`adapters`]: the LoRA adapters and the ControlNet condition a body asks for, checked
//!   against what is served;
//! - [`edit`]: how an uploaded image to edit and its mask become an edit;
//! - [`bounds`]: every numeric and length limit, in one place, read by the validation and
//!   written into the JSON Schemas, so the OpenAPI document cannot drift from what is enforced;
//! - [`params`]: what validation produces (one image's parameters) and checks against (the
//!   loaded model);
//! - [`response`]: the response bodies, `/v1/models` included;
//! - [`error`]: the one error type; its status and field are what the client sees;
//! - [`multipart`]: the `multipart/form-data` parser of the OpenAI edits route;
//! - [`picture`]: uploaded images and masks — recognised, their size checked before decoding,
//!   decoded, resized;
//! - [`output`]: the format images are answered in (PNG, JPEG, WebP);
//! - [`schema`]: the JSON Schemas of all of the above, with the bounds filled in;
//! - [`properties`]: what every body satisfies, checked by the fuzz target and its corpus.
//!
//! The crate has no runtime dependencies (no async runtime, no model; image decoding is the
//! pure-Rust `image` crate), so the fuzz targets and clients build it on its own.

pub mod adapters;
pub mod bounds;
pub mod edit;
pub mod edit_form;
pub mod error;
pub mod multipart;
pub mod openai;
pub mod output;
pub mod params;
pub mod parse;
pub mod picture;
pub mod properties;
pub mod request;
pub mod response;
pub mod sampling;
pub mod schema;
pub mod sdapi;

pub use adapters::{ControlRequest, LoraRequest, PreprocessRequest};
pub use bounds::{Bounds, IntRange, Limits, MAX_GUIDANCE, MAX_IMAGES_PER_REQUEST, SIZE_MULTIPLE};
pub use edit_form::ImageEditRequest;
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use openai::{Delivery, ImagesRequest, MAX_PARTIAL_IMAGES, ResponseFormat, parse_size};
pub use output::{Output, OutputFormat};
pub use params::{
    AdapterInfo, BatchKey, ControlParams, Defaults, EditParams, GenParams, ModelInfo, Preprocess,
    ServedModel, SkipLayerInfo,
};
pub use parse::parse_json;
pub use picture::{Mask, Picture};
pub use request::{Img2ImgRequest, Txt2ImgRequest};
pub use response::{
    COMPLETED_EVENT, EDIT_COMPLETED_EVENT, EDIT_EVENTS, EDIT_PARTIAL_IMAGE_EVENT,
    GENERATION_EVENTS, ImageData, ImageStreamEvent, ImagesResponse, ModelDefaults, ModelEntry,
    ModelLimits, ModelList, PARTIAL_IMAGE_EVENT, StreamEvents, StreamUsage, Txt2ImgResponse,
    UsedControl, UsedParameters,
};
pub use sampling::{Sampling, check_model};
