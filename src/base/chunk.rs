//! [`Chunk`]: the unit that travels on a channel between stages.
//!
//! A chunk holds its values in one `Vec<T>` and its (rare) errors in a
//! second, short list, each error tagged with its position among the
//! values. Stages transform the value vector in tight loops that the
//! compiler vectorises, and check for errors once per chunk instead of once
//! per item. Iterating a chunk yields the items in their original order.

use std::fmt;

use crate::base::ack::Ack;
use crate::base::error::{Result, StreamError};

/// A batch of consecutive items: values and the errors between them.
///
/// Consumers that handle items in bulk read chunks with
/// [`Flow::next_chunk`](crate::Flow::next_chunk); iterating a chunk yields
/// its items, values and errors, in order.
///
/// # Examples
///
/// ```
/// use streamz::StreamError;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let input = vec![Ok(1), Err(StreamError::failed("src", "bad")), Ok(2)];
/// let mut flow = streamz::try_stream(futures::stream::iter(input));
/// let chunk = flow.next_chunk().await.unwrap();
/// assert_eq!(chunk.len(), 3);
/// assert_eq!(chunk.values(), [1, 2]);
/// assert_eq!(chunk.errors().count(), 1);
///
/// let items: Vec<_> = chunk.into_iter().collect();
/// assert!(items[0].is_ok() && items[1].is_err() && items[2].is_ok());
/// # }
/// ```
pub struct Chunk<T> {
    pub(crate) values: Vec<T>,
    /// Each error with the number of values that come before it; sorted.
    pub(crate) errors: Vec<(usize, StreamError)>,
    /// The values' acknowledgements, one per value, when any value has one
    /// (an error carries its own); `None` for a chunk from a source without
    /// acknowledgements, which then costs one branch per chunk.
    pub(crate) acks: Option<Vec<Ack>>,
}

impl<T> fmt::Debug for Chunk<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("values", &self.values.len())
            .field("errors", &self.errors)
            .field("acks", &self.acks.is_some())
            .finish()
    }
}

impl<T> Default for Chunk<T> {
    fn default() -> Self {
        Chunk {
            values: Vec::new(),
            errors: Vec::new(),
            acks: None,
        }
    }
}

impl<T> Chunk<T> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Chunk {
            values: Vec::with_capacity(n),
            errors: Vec::new(),
            acks: None,
        }
    }

    pub(crate) fn from_values(values: Vec<T>) -> Self {
        Chunk {
            values,
            errors: Vec::new(),
            acks: None,
        }
    }

    /// How many items (values and errors) the chunk holds.
    pub fn len(&self) -> usize {
        self.values.len() + self.errors.len()
    }

    /// Whether the chunk holds no items.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.errors.is_empty()
    }

    /// The values, in order, without the errors.
    pub fn values(&self) -> &[T] {
        &self.values
    }

    /// The errors, in order.
    pub fn errors(&self) -> impl ExactSizeIterator<Item = &StreamError> {
        self.errors.iter().map(|(_, e)| e)
    }

    /// Whether the chunk holds any error.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Whether any item of the chunk carries an acknowledgement.
    pub fn has_acks(&self) -> bool {
        self.acks.is_some() || self.errors.iter().any(|(_, e)| e.has_ack())
    }

    /// Takes the acknowledgements of every item, values and errors, out of
    /// the chunk, for a reader that meets them once what it did with the
    /// items is durable (see [`Ack`]). The items stay in the chunk.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut flow = streamz::iter(0..3);
    /// let mut chunk = flow.next_chunk().await.unwrap();
    /// // ... write chunk.values() somewhere durable, then:
    /// chunk.take_acks().into_iter().for_each(streamz::Ack::ack);
    /// # }
    /// ```
    pub fn take_acks(&mut self) -> Vec<Ack> {
        let mut all = self.acks.take().unwrap_or_default();
        for (_, e) in &mut self.errors {
            let ack = e.take_ack();
            if !ack.is_none() {
                all.push(ack);
            }
        }
        all
    }

    /// Meets every acknowledgement the chunk carries (its items were handed
    /// over to a reader that owns their outcome from now on).
    #[inline]
    pub(crate) fn ack_all(&mut self) {
        // Most chunks carry none: two checks, no call.
        if self.acks.is_some() || !self.errors.is_empty() {
            self.ack_each();
        }
    }

    fn ack_each(&mut self) {
        if let Some(acks) = self.acks.take() {
            acks.into_iter().for_each(Ack::ack);
        }
        for (_, e) in &mut self.errors {
            e.take_ack().ack();
        }
    }

    /// Appends a value with its acknowledgement.
    #[inline]
    pub(crate) fn push_acked(&mut self, value: T, ack: Ack) {
        if self.acks.is_some() || !ack.is_none() {
            self.push_ack(ack);
        }
        self.values.push(value);
    }

    /// The acknowledgement of the value about to be pushed, for a chunk
    /// that has (or now gets) acknowledgements: out of the common path.
    #[cold]
    #[inline(never)]
    fn push_ack(&mut self, ack: Ack) {
        match &mut self.acks {
            Some(acks) => acks.push(ack),
            None => {
                let mut acks = Vec::with_capacity(self.values.capacity().max(1));
                acks.extend((0..self.values.len()).map(|_| Ack::none()));
                acks.push(ack);
                self.acks = Some(acks);
            }
        }
    }

    /// Appends a value (with no acknowledgement of its own).
    #[inline]
    pub(crate) fn push_value(&mut self, value: T) {
        if let Some(acks) = &mut self.acks {
            acks.push(Ack::none());
        }
        self.values.push(value);
    }

    /// Iterates the items with the values' acknowledgements beside them
    /// (an error keeps its own inside it; [`Ack::none`] beside it).
    pub(crate) fn into_acked(self) -> IntoAcked<T> {
        IntoAcked {
            acks: self.acks.map(Vec::into_iter),
            items: IntoIter {
                values: self.values.into_iter(),
                errors: self.errors.into_iter(),
                taken: 0,
            },
        }
    }

    /// Splits the chunk into its values and its errors (their relative
    /// order is lost; iterate the chunk to keep it). The values'
    /// acknowledgements are dropped unmet: take them first with
    /// [`take_acks`](Chunk::take_acks) to meet them.
    pub fn into_parts(self) -> (Vec<T>, Vec<StreamError>) {
        (
            self.values,
            self.errors.into_iter().map(|(_, e)| e).collect(),
        )
    }

    /// Appends an item after the ones already in the chunk.
    pub fn push(&mut self, item: Result<T>) {
        match item {
            Ok(v) => self.push_value(v),
            Err(e) => self.push_error(e),
        }
    }

    pub(crate) fn push_error(&mut self, error: StreamError) {
        self.errors.push((self.values.len(), error));
    }

    /// Removes the items pushed after the chunk held `values` values and
    /// `errors` errors (the undo of a step's partial output).
    /// Their acknowledgements go back to the caller (`undone_acks`).
    pub(crate) fn truncate(
        &mut self,
        values: usize,
        errors: usize,
        undone_acks: &mut Vec<Ack>,
    ) -> Vec<Result<T>> {
        if let Some(acks) = &mut self.acks {
            undone_acks.extend(acks.drain(values..));
        }
        let mut undone: Vec<Result<T>> = self.values.drain(values..).map(Ok).collect();
        undone.extend(self.errors.drain(errors..).map(|(_, e)| Err(e)));
        undone
    }

    /// Cuts the chunk into pieces of at most `max` items. A chunk that fits
    /// (the usual case) passes through without allocating.
    pub(crate) fn split(self, max: usize) -> impl Iterator<Item = Chunk<T>> {
        let (fits, oversized) = if self.len() <= max {
            (Some(self), Vec::new())
        } else {
            let mut pieces = Vec::new();
            let mut piece = Chunk::with_capacity(max);
            for (item, ack) in self.into_acked() {
                match item {
                    Ok(v) => piece.push_acked(v, ack),
                    Err(e) => piece.push_error(e),
                }
                if piece.len() == max {
                    pieces.push(std::mem::replace(&mut piece, Chunk::with_capacity(max)));
                }
            }
            if !piece.is_empty() {
                pieces.push(piece);
            }
            (None, pieces)
        };
        fits.into_iter().chain(oversized)
    }
}

impl<T> FromIterator<Result<T>> for Chunk<T> {
    fn from_iter<I: IntoIterator<Item = Result<T>>>(iter: I) -> Self {
        let mut chunk = Chunk::default();
        iter.into_iter().for_each(|item| chunk.push(item));
        chunk
    }
}

impl<T> IntoIterator for Chunk<T> {
    type Item = Result<T>;
    type IntoIter = IntoIter<T>;

    /// Iterates the items; the values' acknowledgements are dropped unmet
    /// (an error keeps its own).
    fn into_iter(self) -> IntoIter<T> {
        IntoIter {
            values: self.values.into_iter(),
            errors: self.errors.into_iter(),
            taken: 0,
        }
    }
}

/// The items of a [`Chunk`], values and errors, in order.
pub struct IntoIter<T> {
    values: std::vec::IntoIter<T>,
    errors: std::vec::IntoIter<(usize, StreamError)>,
    taken: usize,
}

impl<T> Default for IntoIter<T> {
    fn default() -> Self {
        Chunk::default().into_iter()
    }
}

impl<T> fmt::Debug for IntoIter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntoIter")
            .field("remaining", &self.len())
            .finish()
    }
}

impl<T> Iterator for IntoIter<T> {
    type Item = Result<T>;

    #[inline]
    fn next(&mut self) -> Option<Result<T>> {
        if let Some((at, _)) = self.errors.as_slice().first() {
            if *at == self.taken {
                return self.errors.next().map(|(_, e)| Err(e));
            }
        }
        let v = self.values.next()?;
        self.taken += 1;
        Some(Ok(v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.values.len() + self.errors.len();
        (n, Some(n))
    }
}

impl<T> ExactSizeIterator for IntoIter<T> {}

/// The items of a [`Chunk`] with the values' acknowledgements beside them.
pub(crate) struct IntoAcked<T> {
    acks: Option<std::vec::IntoIter<Ack>>,
    items: IntoIter<T>,
}

impl<T> Default for IntoAcked<T> {
    fn default() -> Self {
        Chunk::default().into_acked()
    }
}

impl<T> IntoAcked<T> {
    /// Items left.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// The items left, as a chunk again.
    pub(crate) fn into_chunk(self) -> Chunk<T> {
        let mut chunk = Chunk::with_capacity(self.len());
        for (item, ack) in self {
            match item {
                Ok(v) => chunk.push_acked(v, ack),
                Err(e) => chunk.push_error(e),
            }
        }
        chunk
    }
}

impl<T> Iterator for IntoAcked<T> {
    type Item = (Result<T>, Ack);

    #[inline]
    fn next(&mut self) -> Option<(Result<T>, Ack)> {
        match self.items.next()? {
            Ok(v) => {
                let ack = match &mut self.acks {
                    None => Ack::none(),
                    Some(acks) => acks.next().unwrap_or_default(),
                };
                Some((Ok(v), ack))
            }
            Err(e) => Some((Err(e), Ack::none())),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.items.size_hint()
    }
}

impl<T> ExactSizeIterator for IntoAcked<T> {}

/// Rebuilds the error list of a one-in-one-out stage's output chunk.
///
/// `passed` are the input errors (positions among input values),
/// `failures` the errors the stage made from input values (their input
/// index), and `kept[i]` tells whether input value `i` became an output
/// value. An input error at position `p` stays in front of input value `p`;
/// a failed value takes its own place.
pub(crate) fn place_errors(
    passed: Vec<(usize, StreamError)>,
    failures: Vec<(usize, StreamError)>,
    kept: impl Fn(usize) -> bool,
    inputs: usize,
) -> Vec<(usize, StreamError)> {
    let mut out = Vec::with_capacity(passed.len() + failures.len());
    let mut passed = passed.into_iter().peekable();
    let mut failures = failures.into_iter().peekable();
    let mut outputs = 0; // output values before input value `i`
    for i in 0..=inputs {
        while let Some((_, e)) = passed.next_if(|(p, _)| *p == i) {
            out.push((outputs, e));
        }
        if let Some((_, e)) = failures.next_if(|(f, _)| *f == i) {
            out.push((outputs, e));
        }
        if i < inputs && kept(i) {
            outputs += 1;
        }
    }
    debug_assert!(passed.next().is_none() && failures.next().is_none());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(tag: &str) -> StreamError {
        StreamError::failed("t", tag.to_owned())
    }

    fn render(chunk: Chunk<u32>) -> Vec<String> {
        chunk
            .into_iter()
            .map(|r| match r {
                Ok(v) => v.to_string(),
                Err(e) => e.cause().unwrap().to_string(),
            })
            .collect()
    }

    #[test]
    fn iterates_in_push_order() {
        let mut c = Chunk::default();
        c.push(Err(err("a")));
        c.push(Ok(1));
        c.push(Err(err("b")));
        c.push(Err(err("c")));
        c.push(Ok(2));
        c.push(Err(err("d")));
        assert_eq!(render(c), ["a", "1", "b", "c", "2", "d"]);
    }

    #[test]
    fn split_keeps_order_and_bounds() {
        let c: Chunk<u32> = (0..10)
            .map(|i| {
                if i % 3 == 0 {
                    Err(err(&format!("e{i}")))
                } else {
                    Ok(i)
                }
            })
            .collect();
        let pieces: Vec<_> = c.split(4).collect();
        assert!(pieces.iter().all(|p| p.len() <= 4));
        let all: Vec<String> = pieces.into_iter().flat_map(render).collect();
        assert_eq!(all, ["e0", "1", "2", "e3", "4", "5", "e6", "7", "8", "e9"]);
    }

    #[test]
    fn place_errors_merges_passed_and_failed() {
        // inputs: values v0 v1 v2 with passed error before v1 and at the end;
        // v1 failed, v2 dropped.
        let passed = vec![(1, err("p1")), (3, err("end"))];
        let failures = vec![(1, err("f1"))];
        let kept = |i: usize| i == 0;
        let placed = place_errors(passed, failures, kept, 3);
        let got: Vec<(usize, String)> = placed
            .into_iter()
            .map(|(p, e)| (p, e.cause().unwrap().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "p1".to_owned()),
                (1, "f1".to_owned()),
                (1, "end".to_owned())
            ]
        );
    }
}
