//! [`Partition`]: each value to one of `n` outputs, by key hash, in turn,
//! or by a function of your own.

use std::hash::{Hash, Hasher};

use siphasher::sip::SipHasher13;

use std::borrow::Cow;

use crate::base::config::{ConfigError, EdgeConfig, outputs};
use crate::flow::Flow;
use crate::ops::route::{Pick, spawn_router};

type Choose<T> = Box<dyn FnMut(&T) -> Pick + Send>;

/// Splits a flow into `n` flows, each value to exactly one of them:
/// [`by_key`](Partition::by_key) (the same key always to the same output),
/// [`round_robin`](Partition::round_robin), or
/// [`custom`](Partition::custom). Apply it with
/// [`Flow::partition`](crate::Flow::partition).
///
/// **Where errors go: output 0.** Upstream errors, and the values whose
/// strategy failed, go to the first output: a custom strategy that panics
/// or returns an index out of range turns that value into an error item
/// carrying it (`panicked` or `failed`), never a crash. Read output 0 (or
/// put a [`DeadLetterQueue`](crate::DeadLetterQueue) on it).
///
/// Every output is paced by its reader: a chunk is split and each part
/// sent to its output in turn, so a slow output holds the others back
/// (bounded memory, no loss). Values for an output nobody reads any more
/// are counted as `undelivered`; when no output is read, the stage stops.
///
/// # Examples
///
/// ```
/// use streamz::Partition;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let [even, odd] = <[_; 2]>::try_from(
///     streamz::iter(0..10u32).partition(Partition::custom(2, |x: &u32| (*x % 2) as usize)),
/// ).unwrap();
/// let (even, odd) = tokio::join!(even.collect(), odd.collect());
/// assert_eq!(even.len(), 5);
/// assert_eq!(odd.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
/// # }
/// ```
pub struct Partition<T> {
    n: usize,
    choose: Choose<T>,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl<T> std::fmt::Debug for Partition<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("n", &self.n)
            .field("name", &self.name)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Partition<T> {
    fn validate(&self, input: &Flow<T>) -> Result<(), ConfigError> {
        input
            .pipeline()
            .validate()
            .and(outputs(self.n, "n"))
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Partition", &self.name))
    }
}

impl<T: 'static> Partition<T> {
    /// To output `hash(key(value)) % n`: values with the same key always
    /// go to the same output, in their order.
    ///
    /// # The hash
    ///
    /// SipHash-1-3 with both keys zero (from the `siphasher` crate), over
    /// the bytes the key's [`Hash`] implementation writes, with every
    /// integer written little-endian and `usize`/`isize` widened to 64
    /// bits. Unlike std's `DefaultHasher`, whose algorithm Rust may change,
    /// this is fixed: the mapping is the same in every run, on every
    /// platform and with every compiler, for integers, `str`/`String`,
    /// byte slices, `char`, `bool` and tuples of them (this crate's tests
    /// pin known keys to their outputs). A key of another type is as
    /// stable as its `Hash` implementation: a derived one writes its fields
    /// in order; std hashes a slice, array or `Vec` of integers wider than
    /// a byte as its memory, so such a key maps differently on big-endian
    /// platforms. On 64-bit little-endian targets the hash equals what
    /// `DefaultHasher::new()` gave when this was written, so keys keep the
    /// outputs earlier versions of streamz gave them there.
    ///
    /// Zero outputs, or more than 65,536, are refused when the partition
    /// is applied (field `n`).
    ///
    /// # Examples
    ///
    /// ```
    /// use streamz::Partition;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let users = ["alice", "bob", "alice", "carol", "bob"];
    /// let shards = streamz::iter(users).partition(Partition::by_key(2, |user: &&str| *user));
    /// let [a, b] = <[_; 2]>::try_from(shards).unwrap();
    /// let (a, b) = tokio::join!(a.collect(), b.collect());
    /// let a: Vec<&str> = a.into_iter().map(Result::unwrap).collect();
    /// let b: Vec<&str> = b.into_iter().map(Result::unwrap).collect();
    /// // Every key lands on exactly one output, the same in every run.
    /// assert_eq!(a.len() + b.len(), 5);
    /// assert!(a.iter().all(|user| !b.contains(user)));
    /// # }
    /// ```
    pub fn by_key<K: Hash>(n: usize, mut key: impl FnMut(&T) -> K + Send + 'static) -> Self {
        let m = n.max(1) as u64; // zero is refused before anything runs
        Partition::with(
            n,
            Box::new(move |v| Pick::To((key_hash(&key(v)) % m) as usize)),
        )
    }

    /// To outputs 0, 1, ..., n - 1, 0, ... in turn (zero outputs are
    /// refused when applied).
    pub fn round_robin(n: usize) -> Self {
        let m = n.max(1);
        let mut next = 0;
        Partition::with(
            n,
            Box::new(move |_| {
                let i = next;
                next = (next + 1) % m;
                Pick::To(i)
            }),
        )
    }

    /// To the output `choose` returns. An index of `n` or more makes the
    /// value a `failed` error item on output 0; a panic, a `panicked` one.
    /// Zero outputs are refused when applied.
    pub fn custom(n: usize, mut choose: impl FnMut(&T) -> usize + Send + 'static) -> Self {
        Partition::with(
            n,
            Box::new(move |v| match choose(v) {
                i if i < n => Pick::To(i),
                i => Pick::Failed(
                    format!(
                        "the partition strategy chose output {i} of {n} (0 to {})",
                        n - 1
                    )
                    .into(),
                ),
            }),
        )
    }
}

/// The hash of [`Partition::by_key`]: fixed, documented there.
impl<T> Partition<T> {
    fn with(n: usize, choose: Choose<T>) -> Self {
        Partition {
            n,
            choose,
            name: Cow::Borrowed("partition"),
            edge: None,
        }
    }

    crate::flow::processor::name_and_edge!(
        "Sets the edge of every output (the pipeline's by default)."
    );
}

fn key_hash<K: Hash + ?Sized>(key: &K) -> u64 {
    let mut h = KeyHasher(SipHasher13::new_with_keys(0, 0));
    key.hash(&mut h);
    h.finish()
}

/// SipHash-1-3 fed integers little-endian, `usize`/`isize` as 64 bits: the
/// `Hasher` defaults write native-endian bytes of the native width, which
/// would make the hash depend on the platform.
struct KeyHasher(SipHasher13);

macro_rules! le_writes {
    ($($method:ident($t:ty) as $as:ty),* $(,)?) => {
        $(
            #[inline]
            fn $method(&mut self, i: $t) {
                self.0.write(&(i as $as).to_le_bytes());
            }
        )*
    };
}

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0.finish()
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    le_writes! {
        write_u8(u8) as u8,
        write_u16(u16) as u16,
        write_u32(u32) as u32,
        write_u64(u64) as u64,
        write_u128(u128) as u128,
        write_usize(usize) as u64,
        write_i8(i8) as i8,
        write_i16(i16) as i16,
        write_i32(i32) as i32,
        write_i64(i64) as i64,
        write_i128(i128) as i128,
        write_isize(isize) as i64,
    }
}

impl<T: Send + 'static> Flow<T> {
    /// Splits the flow by `partition` into its `n` outputs, in order of
    /// index; errors go to output 0.
    ///
    /// An invalid partition (zero outputs or more than 65,536, an invalid
    /// edge) starts nothing, as [`Flow::pipe`] does: each of the `n`
    /// outputs (one if `n` is zero or too many) holds one
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) item.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn partition(self, partition: Partition<T>) -> Vec<Flow<T>> {
        if let Err(error) = partition.validate(&self) {
            let n = partition.n;
            return self.refuse_fan_out(partition.name.into_owned(), error, n);
        }
        self.start_partition(partition)
    }

    /// As [`partition`](Flow::partition), or why the partition is invalid.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] naming the stage and the field.
    #[track_caller]
    pub fn try_partition(self, partition: Partition<T>) -> Result<Vec<Flow<T>>, ConfigError> {
        partition.validate(&self)?;
        Ok(self.start_partition(partition))
    }

    #[track_caller]
    fn start_partition(self, partition: Partition<T>) -> Vec<Flow<T>> {
        spawn_router(
            self,
            &partition.name,
            partition.edge,
            partition.n,
            0,
            partition.choose,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::key_hash;

    /// Golden values: a change of algorithm, or of how these keys are fed
    /// to it, fails here. (They equal std's `DefaultHasher::new()` on
    /// x86_64 with Rust 1.95, an independent implementation of the same
    /// SipHash-1-3.)
    #[test]
    fn the_key_hash_is_pinned() {
        assert_eq!(key_hash(&0u32), 0xcc22_47b7_9ac4_8af0);
        assert_eq!(key_hash(&1u32), 0x182e_2c74_c37b_7090);
        assert_eq!(key_hash(&42u64), 0x7b3e_724b_36eb_df51);
        assert_eq!(key_hash(&7usize), 0x6634_b0bd_a4fe_8a7b);
        assert_eq!(key_hash(&7u64), 0x6634_b0bd_a4fe_8a7b, "usize is u64");
        assert_eq!(key_hash(&-1i64), 0x2f20_5be2_fec8_e38d);
        assert_eq!(key_hash(&u128::MAX), 0x3502_9a3b_6274_a39b);
        assert_eq!(key_hash("alice"), 0x02c7_c124_66e2_5a60);
        assert_eq!(key_hash(&String::from("carol")), 0xdbed_5827_ab68_657b);
        assert_eq!(key_hash(&(3u8, "x")), 0x88ba_a074_922d_099d);
        assert_eq!(key_hash(&'z'), 0x7f5e_5365_16ab_4379);
        assert_eq!(key_hash(&true), 0x44bc_103b_1f85_40ed);
        assert_eq!(key_hash(b"bytes".as_slice()), 0x557c_9230_302b_45ec);
    }
}
