//! The HTTP API of `sd35-server`: what a client sends and gets back, and what the server
//! accepts.
//!
//! - [`request`]: the request bodies, parsed strictly (one JSON object, no unknown fields, no
//!   trailing bytes) and validated into per-image [`params::GenParams`];
//! - [`bounds`]: every numeric and length limit, in one place, read by the validation and
//!   written into the JSON Schemas, so the OpenAPI document cannot drift from what is enforced;
//! - [`response`]: the response bodies, `/v1/models` included;
//! - [`error`]: the one error type; its status and field are what the client sees;
//! - [`sdapi`]: the AUTOMATIC1111 web API subset (`/sdapi/v1/...`);
//! - [`schema`]: the JSON Schemas of all of the above, with the bounds filled in;
//! - [`properties`]: what every body satisfies, checked by the fuzz target and its corpus.
//!
//! The crate has no runtime dependencies (no async runtime, no model), so the fuzz targets and
//! clients build it on its own.

pub mod bounds;
pub mod error;
pub mod params;
pub mod properties;
pub mod request;
pub mod response;
pub mod schema;
pub mod sdapi;

pub use bounds::{Bounds, IntRange, Limits, MAX_GUIDANCE, MAX_IMAGES_PER_REQUEST, SIZE_MULTIPLE};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use params::{BatchKey, Defaults, GenParams, ModelInfo, SkipLayerInfo};
pub use request::{
    Delivery, ImagesRequest, MAX_PARTIAL_IMAGES, ResponseFormat, Sampling, Txt2ImgRequest,
    check_model, parse_json, parse_size,
};
pub use response::{
    COMPLETED_EVENT, ImageData, ImageStreamEvent, ImagesResponse, ModelDefaults, ModelEntry,
    ModelLimits, ModelList, PARTIAL_IMAGE_EVENT, StreamUsage, Txt2ImgResponse, UsedParameters,
};
