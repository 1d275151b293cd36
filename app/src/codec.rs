//! How server functions answer: JSON, decoded from text.
//!
//! Leptos hydrates resources with `serde_json::from_str`, while the stock JSON encoding
//! decodes server-function answers with `from_slice`: every answer type's deserializer was
//! compiled into the browser bundle twice, once per reader. Decoding answers from `&str`
//! too keeps one copy.

use leptos::server_fn::codec::Post;
use leptos::server_fn::{Bytes, ContentType, Decodes, Encodes, Format, FormatType};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// JSON, read back through `serde_json::from_str`.
pub struct JsonTextEncoding;

/// The output encoding of every server function (`#[server(output = JsonText)]`).
pub type JsonText = Post<JsonTextEncoding>;

impl ContentType for JsonTextEncoding {
    const CONTENT_TYPE: &'static str = "application/json";
}

impl FormatType for JsonTextEncoding {
    const FORMAT_TYPE: Format = Format::Text;
}

impl<T: Serialize> Encodes<T> for JsonTextEncoding {
    type Error = serde_json::Error;

    fn encode(output: &T) -> Result<Bytes, Self::Error> {
        serde_json::to_vec(output).map(Bytes::from)
    }
}

impl<T: DeserializeOwned> Decodes<T> for JsonTextEncoding {
    type Error = serde_json::Error;

    fn decode(bytes: Bytes) -> Result<T, Self::Error> {
        let text = std::str::from_utf8(&bytes)
            .map_err(|err| serde::de::Error::custom(format!("the answer is not UTF-8: {err}")))?;
        serde_json::from_str(text)
    }
}
