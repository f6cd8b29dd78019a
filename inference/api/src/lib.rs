//! The HTTP API of `sd35-server`: what a client sends and gets back, and what the server
//! accepts.
//!
//! - [`request`]: the request bodies, parsed strictly (one JSON object, no unknown fields, no
//!   trailing bytes) and validated into per-image [`params::GenParams`];
//! - [`bounds`]: every numeric and length limit, in one place, read by the validation and
//!   written into the JSON Schemas, so the OpenAPI document cannot drift from what is enforced;
//! - [`response`]: the response bodies, `/v1/models` included;
//! - [`error`]: the one error type; its status and field are what the client sees;
//! - [`edit`]: the editing bodies (img2img and inpainting) and how an upload becomes an edit;
//! - [`multipart`]: the `multipart/form-data` parser of the OpenAI edits route;
//! - [`picture`]: uploaded images and masks — recognised, their size checked before decoding,
//!   decoded, resized;
//! - [`output`]: the format images are answered in (PNG, JPEG, WebP);
//! - [`sdapi`]: the AUTOMATIC1111 web API subset (`/sdapi/v1/...`);
//! - [`schema`]: the JSON Schemas of all of the above, with the bounds filled in;
//! - [`properties`]: what every body satisfies, checked by the fuzz target and its corpus.
//!
//! The crate has no runtime dependencies (no async runtime, no model; image decoding is the
//! pure-Rust `image` crate), so the fuzz targets and clients build it on its own.

pub mod bounds;
pub mod edit;
pub mod error;
pub mod multipart;
pub mod output;
pub mod params;
pub mod picture;
pub mod properties;
pub mod request;
pub mod response;
pub mod schema;
pub mod sdapi;

pub use bounds::{Bounds, IntRange, Limits, MAX_GUIDANCE, MAX_IMAGES_PER_REQUEST, SIZE_MULTIPLE};
pub use edit::{ImageEditRequest, Img2ImgRequest};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use output::{Output, OutputFormat};
pub use params::{BatchKey, Defaults, EditParams, GenParams, ModelInfo, SkipLayerInfo};
pub use picture::{Mask, Picture};
pub use request::{
    Delivery, ImagesRequest, MAX_PARTIAL_IMAGES, ResponseFormat, Sampling, Txt2ImgRequest,
    check_model, parse_json, parse_size,
};
pub use response::{
    COMPLETED_EVENT, EDIT_COMPLETED_EVENT, EDIT_EVENTS, EDIT_PARTIAL_IMAGE_EVENT,
    GENERATION_EVENTS, ImageData, ImageStreamEvent, ImagesResponse, ModelDefaults, ModelEntry,
    ModelLimits, ModelList, PARTIAL_IMAGE_EVENT, StreamEvents, StreamUsage, Txt2ImgResponse,
    UsedParameters,
};
