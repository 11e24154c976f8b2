//! The harness of the parser property tests: a counting allocator that
//! bounds memory per case, a time budget per case, the mutation strategy
//! (start from a valid encoding, then flip, set, insert, delete, truncate or
//! duplicate bytes) and the case counts.
//!
//! Must not: know any parser. Everything parser-specific lives in the test
//! files that use it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Counts, per thread, the bytes live and the largest single request, so a
/// case can assert that a huge length prefix did not become a huge buffer.
/// Per-thread so that cases running in parallel do not see each other.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + size as isize;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - size as isize));
}

// SAFETY: every method forwards to the system allocator with the same
// arguments; the bookkeeping only touches const-initialised thread-locals,
// which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What one case cost.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Wall time.
    pub elapsed: Duration,
    /// Peak growth of this thread's live heap during the case.
    pub peak_bytes: usize,
    /// The largest single allocation.
    pub largest_alloc: usize,
}

/// Wall time one case may take. Generous (the machine is shared and debug
/// builds are slow): it catches quadratic or exponential blow-ups, not
/// micro-regressions.
pub const TIME_BUDGET: Duration = Duration::from_secs(3);

/// Wall time for a case that also writes files with fsync (applying a
/// Secret, installing an issuer, opening a database): on a loaded shared
/// disk one fsync can take seconds, which says nothing about the parser.
pub const IO_TIME_BUDGET: Duration = Duration::from_secs(30);

/// Runs `f` and measures it.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Cost) {
    RT.with(|_| ());
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|m| m.set(0));
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed();
    let peak = PEAK.with(Cell::get) - base;
    (
        out,
        Cost {
            elapsed,
            peak_bytes: peak.max(0) as usize,
            largest_alloc: LARGEST.with(Cell::get),
        },
    )
}

impl Cost {
    /// Asserts the case stayed within the budget for an input of `len`
    /// bytes: time under [`TIME_BUDGET`], no single allocation above
    /// `fixed + 16·len` and no more than `4·fixed + 64·len` live at once.
    /// `fixed` is what the parser needs whatever the input (e.g. a CA's
    /// signing context); a length prefix claiming gigabytes fails this.
    pub fn check(&self, what: &str, len: usize, fixed: usize) -> Result<(), TestCaseError> {
        self.check_within(TIME_BUDGET, what, len, fixed)
    }

    /// [`Cost::check`] with another time budget (see [`IO_TIME_BUDGET`]).
    pub fn check_within(
        &self,
        budget: Duration,
        what: &str,
        len: usize,
        fixed: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert!(
            self.elapsed < budget,
            "{what}: a {len}-byte input took {:?}",
            self.elapsed
        );
        prop_assert!(
            self.largest_alloc <= fixed + 16 * len,
            "{what}: a {len}-byte input made a {}-byte allocation",
            self.largest_alloc
        );
        prop_assert!(
            self.peak_bytes <= 4 * fixed + 64 * len,
            "{what}: a {len}-byte input held {} bytes at once",
            self.peak_bytes
        );
        Ok(())
    }
}

/// `cases` per property in CI, or `PROPTEST_CASES` when set (the release
/// run: `PROPTEST_CASES=100000 cargo test --release --test fuzz_parsers`).
pub fn cases(ci: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci);
    Config {
        cases,
        // Shrinking a slow pipeline case can take minutes; a few hundred
        // steps already gives a readable counterexample.
        max_shrink_iters: 512,
        ..Config::default()
    }
}

/// One edit of a valid encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR the byte at (index mod len) with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite a byte, favouring DER/varint length and tag values.
    Set(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Delete up to n bytes.
    Delete(usize, usize),
    /// Keep only the first (index mod len) bytes.
    Truncate(usize),
    /// Copy a range to another place (repeated structures, nested lengths).
    Duplicate(usize, usize, usize),
}

fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        Just(0x00),
        Just(0x7f),
        Just(0x80),
        Just(0x81),
        Just(0x82),
        Just(0x84),
        Just(0xff),
        Just(b'.'),
        Just(b'"'),
        Just(b'\n'),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), vec(interesting_byte(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..128usize, any::<usize>())
            .prop_map(|(i, n, at)| Mutation::Duplicate(i, n, at)),
    ];
    vec(one, 1..=4)
}

/// Applies `ms` to `v`.
pub fn apply(mut v: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = v.len();
        match m {
            Mutation::Flip(i, mask) if len > 0 => v[i % len] ^= mask,
            Mutation::Set(i, b) if len > 0 => v[i % len] = *b,
            Mutation::Insert(i, b) => {
                let at = i % (len + 1);
                v.splice(at..at, b.iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let at = i % len;
                let end = (at + n).min(len);
                v.drain(at..end);
            }
            Mutation::Truncate(i) => v.truncate(i % (len + 1)),
            Mutation::Duplicate(i, n, at) if len > 0 => {
                let from = i % len;
                let end = (from + n).min(len);
                let chunk = v[from..end].to_vec();
                let at = at % (len + 1);
                v.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    v
}

/// A seed (by index into `seeds`) and a mutation of it.
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = (usize, Vec<u8>)> {
    let n = seeds.len();
    (0..n, mutations()).prop_map(move |(i, ms)| (i, apply(seeds[i].clone(), &ms)))
}

/// Arbitrary bytes, mostly short, sometimes up to `max`.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..256),
        1 => vec(any::<u8>(), 0..max),
    ]
}

thread_local! {
    /// One current-thread runtime per test thread, built before any case is
    /// measured, so its own buffers are not charged to the parser.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

/// Runs a future to completion on this thread's runtime (so its
/// allocations are counted on this thread).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}
