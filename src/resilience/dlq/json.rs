//! [`JsonItems`]: records that keep failed items of several types.

use std::any::type_name;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::base::error::StreamError;
use crate::resilience::dlq::Taken;

type Convert = fn(&mut StreamError) -> Option<serde_json::Result<Value>>;

/// The item types a [`DeadLetterQueue::json`](crate::DeadLetterQueue::json)
/// records, as JSON values.
///
/// A chain's stages fail on items of their own input types: a parser on
/// the raw line, an enricher on the parsed order. One dead-letter queue at
/// the end of the chain keeps them all when it knows each type. An item of
/// a type not listed is still recorded, with its error context and a note
/// naming its type.
///
/// ```
/// use streamz::dlq::JsonItems;
/// use streamz::StreamError;
///
/// let items = JsonItems::new().of::<String>().of::<(u32, i64)>();
/// assert_eq!(format!("{items:?}"), r#"JsonItems(["alloc::string::String", "(u32, i64)"])"#);
/// ```
#[derive(Clone, Default)]
pub struct JsonItems {
    /// Each recorded type: its Rust name, its tag if it has one, and how
    /// to write it as JSON.
    types: Vec<(&'static str, Option<Arc<str>>, Convert)>,
}

impl fmt::Debug for JsonItems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JsonItems")
            .field(
                &self
                    .types
                    .iter()
                    .map(|(name, tag, _)| tag.as_deref().unwrap_or(name))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl JsonItems {
    /// No types yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records items of type `I`; their records name the type with its
    /// Rust type name, which is not stable across compiler versions (see
    /// [`tagged`](JsonItems::with_tag) for a name a program can rely on).
    pub fn of<I: Serialize + 'static>(mut self) -> Self {
        self.types.push((type_name::<I>(), None, convert::<I>));
        self
    }

    /// Records items of type `I` under `tag` (say `"order.v1"`): their
    /// records' [`item_type`](crate::dlq::DeadLetter::item_type) is the tag,
    /// stable for as long as you keep it, which says what to read the item
    /// back as ([`DeadLetter::item_as`](crate::dlq::DeadLetter::item_as)).
    pub fn with_tag<I: Serialize + 'static>(mut self, tag: impl Into<Arc<str>>) -> Self {
        self.types
            .push((type_name::<I>(), Some(tag.into()), convert::<I>));
        self
    }

    /// The error's item as JSON with its tag, or the record's note saying
    /// why not.
    pub(crate) fn take(&self, error: &mut StreamError) -> Result<Taken<Value>, String> {
        for (name, tag, convert) in &self.types {
            match convert(error) {
                Some(Ok(value)) => {
                    drop(error.take_any_item());
                    return Ok((value, tag.clone()));
                }
                Some(Err(e)) => {
                    let tagged = tag
                        .as_deref()
                        .map(|tag| format!(" (tagged `{tag}`)"))
                        .unwrap_or_default();
                    return Err(format!(
                        "the failed `{name}` item{tagged} could not be written as JSON: {e}"
                    ));
                }
                None => {}
            }
        }
        let names: Vec<String> = self
            .types
            .iter()
            .map(|(n, _, _)| format!("`{n}`"))
            .collect();
        let records = if names.is_empty() {
            "no item types".to_owned()
        } else {
            names.join(", ")
        };
        Err(crate::resilience::dlq::not_recorded(error, &records))
    }
}

fn convert<I: Serialize + 'static>(error: &mut StreamError) -> Option<serde_json::Result<Value>> {
    error
        .item_mut::<I>()
        .map(|item| serde_json::to_value(&*item))
}
