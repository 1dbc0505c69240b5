//! [`Switch`]: each value to the route its key names.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;

use std::borrow::Cow;

use crate::base::config::{ConfigError, EdgeConfig};
use crate::flow::Flow;
use crate::ops::route::{Pick, spawn_router};

/// Routes each value by a key function to named routes, with an optional
/// default route for keys that name none. Apply it with
/// [`Flow::switch`](crate::Flow::switch), then take each route's flow
/// from the [`Routes`].
///
/// **Values with no route** (a key that names no route, and no default)
/// are dropped and counted (`dropped` on the stage): never lost silently.
///
/// **Where errors go:** upstream errors, and values whose key function
/// panicked (as `panicked` error items carrying them), go to the default
/// route if there is one, otherwise to the first route declared.
///
/// A route whose flow is dropped (also one left in [`Routes`] when the
/// `Routes` is dropped) has its values counted as `undelivered`. A route's
/// flow that is kept but not read holds the other routes back, as any flow
/// nobody reads holds back its producer: take every route you need, then
/// drop the `Routes`. With a source that replays (its items carry an
/// [`Ack`](crate::Ack)), values counted `undelivered` are never decided:
/// the source reads them again after a restart and meanwhile stops at its
/// `max_unacked` (docs/recovery.md, "Known gaps"); give every route a
/// reader there.
///
/// # Examples
///
/// ```
/// use streamz::Switch;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let switch = Switch::new(|order: &(&str, u32)| order.0)
///     .route("de")
///     .route("fr")
///     .otherwise();
/// let mut routes = streamz::iter([("de", 1), ("fr", 2), ("it", 3), ("de", 4)]).switch(switch);
/// let (de, fr, rest) = (routes.take("de").unwrap(), routes.take("fr").unwrap(), routes.take_default().unwrap());
/// drop(routes); // nothing left in it
/// let (de, fr, rest) = tokio::join!(de.collect(), fr.collect(), rest.collect());
/// assert_eq!(de.len(), 2);
/// assert_eq!(fr.len(), 1);
/// assert_eq!(rest.into_iter().map(|r| r.unwrap().1).collect::<Vec<_>>(), [3]);
/// # }
/// ```
pub struct Switch<K, F> {
    key: F,
    routes: Vec<K>,
    default: bool,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl<K: fmt::Debug, F> fmt::Debug for Switch<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switch")
            .field("routes", &self.routes)
            .field("default", &self.default)
            .field("name", &self.name)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl<K, F> Switch<K, F> {
    /// A switch on the key `key` returns, without routes yet.
    pub fn new<T>(key: F) -> Self
    where
        F: FnMut(&T) -> K,
    {
        Switch {
            key,
            routes: Vec::new(),
            default: false,
            name: Cow::Borrowed("switch"),
            edge: None,
        }
    }

    crate::flow::processor::name_and_edge!(
        "Sets the edge of every route (the pipeline's by default)."
    );

    /// Adds a route for values whose key is `key`.
    pub fn route(mut self, key: K) -> Self {
        self.routes.push(key);
        self
    }

    /// Adds the default route, for values whose key names no route.
    pub fn otherwise(mut self) -> Self {
        self.default = true;
        self
    }
}

/// The flows of a [`Switch`]'s routes.
pub struct Routes<K, T> {
    named: HashMap<K, Flow<T>>,
    default: Option<Flow<T>>,
}

impl<K: fmt::Debug, T> fmt::Debug for Routes<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routes")
            .field("named", &self.named.keys().collect::<Vec<_>>())
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl<K: Hash + Eq, T> Routes<K, T> {
    /// The flow of the route for `key` (once; `None` after, or for a key
    /// with no route).
    pub fn take<Q>(&mut self, key: &Q) -> Option<Flow<T>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.named.remove(key)
    }

    /// The flow of the default route (once; `None` without one).
    pub fn take_default(&mut self) -> Option<Flow<T>> {
        self.default.take()
    }
}

impl<K: Hash + Eq + Clone, F> Switch<K, F> {
    /// Checks the switch and maps each routed key to its output.
    fn index<T: Send + 'static>(&self, input: &Flow<T>) -> Result<HashMap<K, usize>, ConfigError> {
        let checked = input
            .pipeline()
            .validate()
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .and_then(|()| {
                if self.routes.is_empty() && !self.default {
                    return Err(ConfigError::new(
                        "routes",
                        "must name at least one route, or a default",
                    ));
                }
                let mut index = HashMap::with_capacity(self.routes.len());
                for (i, k) in self.routes.iter().enumerate() {
                    if let Some(first) = index.insert(k.clone(), i) {
                        return Err(ConfigError::new(
                            "routes",
                            format!(
                                "must name each key once (routes {first} and {i} name the same key)"
                            ),
                        ));
                    }
                }
                Ok(index)
            });
        checked.map_err(|e| e.in_stage("Switch", &self.name))
    }
}

impl<T: Send + 'static> Flow<T> {
    /// Routes the flow's values by `switch`.
    ///
    /// An invalid switch (no route and no default, a key routed twice, an
    /// invalid edge) starts nothing, as [`Flow::pipe`] does: each route
    /// holds one [`ErrorKind::Config`](crate::ErrorKind::Config) item, and
    /// [`Pipeline::join`](crate::Pipeline::join) reports it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn switch<K, F>(self, switch: Switch<K, F>) -> Routes<K, T>
    where
        K: Hash + Eq + Clone + Send + 'static,
        F: FnMut(&T) -> K + Send + 'static,
    {
        match switch.index(&self) {
            Ok(index) => self.start_switch(switch, index),
            Err(error) => {
                let n = switch.routes.len() + usize::from(switch.default);
                let mut flows = self.refuse_fan_out(switch.name.into_owned(), error, n);
                let default = if switch.default { flows.pop() } else { None };
                Routes {
                    named: switch.routes.into_iter().zip(flows).collect(),
                    default,
                }
            }
        }
    }

    /// As [`switch`](Flow::switch), or why the switch is invalid.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] naming the stage and the field (`routes`,
    /// `edge.*`).
    #[track_caller]
    pub fn try_switch<K, F>(self, switch: Switch<K, F>) -> Result<Routes<K, T>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + 'static,
        F: FnMut(&T) -> K + Send + 'static,
    {
        let index = switch.index(&self)?;
        Ok(self.start_switch(switch, index))
    }

    #[track_caller]
    fn start_switch<K, F>(self, switch: Switch<K, F>, index: HashMap<K, usize>) -> Routes<K, T>
    where
        K: Hash + Eq + Clone + Send + 'static,
        F: FnMut(&T) -> K + Send + 'static,
    {
        let Switch {
            mut key,
            routes,
            default,
            name,
            edge,
        } = switch;
        let n = routes.len() + usize::from(default);
        // The default route is the last output; errors go there, or to the
        // first route without one.
        let errors_to = if default { n - 1 } else { 0 };
        let pick = move |v: &T| match index.get(&key(v)) {
            Some(&i) => Pick::To(i),
            None if default => Pick::To(n - 1),
            None => Pick::Unrouted,
        };
        let mut flows = spawn_router(self, &name, edge, n, errors_to, pick);
        let default = if default { flows.pop() } else { None };
        Routes {
            named: routes.into_iter().zip(flows).collect(),
            default,
        }
    }
}
