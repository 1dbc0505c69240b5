//! The [`Processor`] trait: one stage of a pipeline.

use crate::flow::Flow;

/// A named stage that turns a flow of `In` into a flow of `Out`.
///
/// Most stages are built from a per-item [`Step`](crate::Step) and run with
/// [`Stage`](crate::Stage); implement `Processor` directly to package a
/// reusable piece of pipeline, or an operator that needs its own task logic.
///
/// # Examples
///
/// A processor that composes existing stages:
///
/// ```
/// use streamz::{Flow, Processor};
///
/// /// Parses lines into numbers and keeps the positive ones.
/// struct PositiveNumbers;
///
/// impl Processor<String, i64> for PositiveNumbers {
///     fn name(&self) -> &str {
///         "positive-numbers"
///     }
///
///     fn process(self, input: Flow<String>) -> Flow<i64> {
///         input
///             .try_map(|line: &String| line.trim().parse::<i64>())
///             .filter(|n: &i64| *n > 0)
///             .async_boundary(self.name().to_owned())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let lines = ["4", "-2", "x", "9"].map(String::from);
/// let out = streamz::iter(lines).pipe(PositiveNumbers).collect().await;
/// assert_eq!(out.len(), 3); // 4, the error for "x", 9
/// # }
/// ```
pub trait Processor<In, Out> {
    /// The stage's name, used for counters, tracing spans and error items.
    fn name(&self) -> &str;

    /// Checks the stage's settings. [`Flow::pipe`](crate::Flow::pipe) and
    /// [`Flow::try_pipe`](crate::Flow::try_pipe) call it first and start
    /// the stage only if it passes. The default accepts everything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) naming the field, made with
    /// [`in_stage`](crate::ConfigError::in_stage) so it names the
    /// operator and this stage.
    fn validate(&self) -> Result<(), crate::ConfigError> {
        Ok(())
    }

    /// Starts the stage on `input` and returns its output. Stages that need
    /// a task spawn it here, so this must be called inside a tokio runtime.
    fn process(self, input: Flow<In>) -> Flow<Out>;
}

/// The two setters every operator's builder has, written once: `named`
/// and `with_edge`, for a builder with the fields
/// `name: Cow<'static, str>` and `edge: Option<EdgeConfig>`. The argument
/// is the first line of `with_edge`'s doc (what the edge is of).
macro_rules! name_and_edge {
    ($edge_doc:literal) => {
        /// Names the stage (for counters, spans and errors).
        pub fn named(mut self, name: impl Into<std::borrow::Cow<'static, str>>) -> Self {
            self.name = name.into();
            self
        }

        #[doc = $edge_doc]
        ///
        /// Checked when the stage is piped
        /// ([`EdgeConfig::validate`](crate::EdgeConfig::validate)).
        pub fn with_edge(mut self, edge: crate::EdgeConfig) -> Self {
            self.edge = Some(edge);
            self
        }
    };
}
pub(crate) use name_and_edge;
