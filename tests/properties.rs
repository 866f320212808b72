//! Property tests: parsers and planners fed arbitrary input (proptest, with its shrinking),
//! checked for what must hold whatever the input: no panic, a clear error or a result with
//! its invariants.
//!
//! Covered: the CSI volume-context parser (arbitrary keys, values and secrets), endpoint
//! normalisation (arbitrary strings), range splitting and CRC-64 combining (arbitrary sizes,
//! part sizes, cut points and arrival orders), and the prefetcher's read planning
//! (arbitrary mixes of sequential runs, small steps and jumps).

use std::collections::HashMap;
use std::sync::Arc;

use fillfs::cache::{BlockCache, ObjectId, ObjectRef};
use fillfs::csi::volume;
use fillfs::populate::copy::split_ranges;
use fillfs::populate::integrity::RangeCrcs;
use fillfs::prefetch::{PrefetchBudget, Prefetcher};
use fillfs::store::{SourceUrl, Store, StoreConfig, Version};
use proptest::prelude::*;

/// Any string, with a bias towards the characters parsers trip on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ a-zA-Z0-9:/@.?#%_=-]{0,40}",
        "[0-9]{1,30}(\\.[0-9]{0,10})?(ms|s|m|h|d|y|KiB|MiB|GiB|Ki|Mi|Gi|k|M|G)?",
        Just(String::new()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    let known: Vec<String> = volume::KEYS.iter().map(|(k, _)| k.to_string()).collect();
    prop_oneof![
        4 => proptest::sample::select(known),
        1 => text(),
        1 => Just("csi.storage.k8s.io/pod.name".to_string()),
    ]
}

/// Strings shaped like endpoints: scheme or none, labels, a port or none, a path or none,
/// in any case, with stray characters now and then.
fn endpoint() -> impl Strategy<Value = String> {
    "( |(?i:https?|ftp)://)?[a-zA-Z0-9-]{1,8}(\\.[a-zA-Z0-9-]{1,8}){0,3}(\\[::1\\])?(:[0-9]{0,6}){0,2}(/[a-zA-Z0-9._~%:@/ ?#-]{0,12})?"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Whatever a Pod or PV says, parsing answers (never panics), and the answer never
    /// repeats a secret's value.
    #[test]
    fn the_volume_context_parser_answers_every_input_without_echoing_secrets(
        context in proptest::collection::hash_map(key(), text(), 0..8),
        secret in "[a-zA-Z0-9+/]{12,40}",
        id in "[A-Z0-9]{8,20}",
    ) {
        let mut secrets = HashMap::new();
        secrets.insert("akId".to_string(), id.clone());
        secrets.insert("akSecret".to_string(), secret.clone());
        if let Err(msg) = volume::parse(&context, &secrets) {
            prop_assert!(!msg.is_empty());
            prop_assert!(!msg.contains(&secret), "secret in {msg:?}");
        }
    }

    /// Any string either normalises to one spelling (which normalises to itself, has a
    /// scheme, and carries no credentials) or is refused with a message that does not
    /// repeat a password.
    #[test]
    fn endpoint_normalisation_is_idempotent_and_never_keeps_credentials(
        raw in prop_oneof![text(), endpoint()],
        password in "[a-z]{6,12}[0-9]{2}",
    ) {
        match volume::normalize_endpoint(&raw) {
            Ok(n) => {
                prop_assert!(n.starts_with("http://") || n.starts_with("https://"), "{n:?}");
                prop_assert!(!n.contains('@'), "{n:?}");
                prop_assert_eq!(volume::normalize_endpoint(&n), Ok(n.clone()));
            }
            Err(msg) => prop_assert!(!msg.is_empty()),
        }
        let with_password = format!("http://admin:{password}@{raw}");
        let err = volume::normalize_endpoint(&with_password).expect_err("credentials refused");
        prop_assert!(!err.contains(&password), "password in {err:?}");
    }

    /// Ranges tile `0..size` in order, none empty, none above the part size (a part size
    /// of 0 is taken as 1, not a panic).
    #[test]
    fn ranges_tile_the_object(size in 0u64..10_000_000, part in 0u64..3_000_000) {
        let mut next = 0;
        let mut count = 0u64;
        for r in split_ranges(size, part) {
            prop_assert_eq!(r.start, next);
            prop_assert!(!r.is_empty());
            prop_assert!(r.end - r.start <= part.max(1));
            next = r.end;
            count += 1;
            prop_assert!(count <= size, "more ranges than bytes");
        }
        prop_assert_eq!(next, size);
    }

    /// CRC-64s of ranges, added in any order, combine into the whole object's.
    #[test]
    fn range_crcs_combine_into_the_whole_objects_in_any_arrival_order(
        data in proptest::collection::vec(any::<u8>(), 0..20_000),
        cuts in proptest::collection::vec(any::<u16>(), 0..12),
        seed in any::<u64>(),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|c| *c as usize % (data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points.dedup();
        let mut ranges: Vec<(usize, usize)> = points.windows(2).map(|w| (w[0], w[1])).collect();
        // A deterministic shuffle from the seed: ranges arrive in any order.
        let mut x = seed | 1;
        for i in (1..ranges.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ranges.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let crc = |b: &[u8]| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, b);
        let mut r = RangeCrcs::default();
        for (a, b) in ranges {
            r.add(a as u64, (b - a) as u64, crc(&data[a..b]), None);
        }
        prop_assert_eq!(r.combined(), crc(&data));
    }
}

/// One read of a plan: where it lands relative to the previous one.
#[derive(Debug, Clone)]
enum Step {
    /// Right after the previous read (a stream).
    Next(u64),
    /// A little before or after it (the kernel's readahead, out of order).
    Near(i64, u64),
    /// Anywhere.
    Jump(u64, u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u64..300_000).prop_map(Step::Next),
        2 => (-200_000i64..200_000, 1u64..100_000).prop_map(|(d, l)| Step::Near(d, l)),
        1 => (any::<u64>(), 1u64..300_000).prop_map(|(o, l)| Step::Jump(o, l)),
    ]
}

const BS: u64 = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Whatever the access pattern (streams, out-of-order neighbours, jumps, reads past the
    /// end), every read returns exactly the object's bytes, and a closed handle holds no
    /// budget.
    #[test]
    fn prefetch_plans_return_exact_bytes_for_any_access_pattern(
        size in 1u64..(40 * BS),
        steps in proptest::collection::vec(step(), 1..60),
        budget_blocks in 1u64..12,
        max_window in 1u64..16,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + i / 257) as u8).collect();
        std::fs::write(dir.path().join("obj"), &data).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let url = SourceUrl::parse(&format!("file://{}", dir.path().display())).unwrap();
            let store = Store::new(&StoreConfig::new(url, None, None), Vec::new()).unwrap();
            let obj = ObjectRef {
                id: Arc::new(ObjectId { store: "p".into(), key: "obj".into(), version: Version::Any }),
                size,
            };
            let cache = BlockCache::new(8 * BS, BS);
            let budget = PrefetchBudget::new(budget_blocks * BS);
            let mut p = Prefetcher::new(store, cache, budget.clone(), obj, max_window);
            let mut at = 0u64;
            for s in &steps {
                let (off, len) = match *s {
                    Step::Next(l) => (at, l),
                    Step::Near(d, l) => (at.saturating_add_signed(d), l),
                    Step::Jump(o, l) => (o % (size + BS), l),
                };
                let got = p.plan_read(off, len).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want = if off >= size { &[][..] } else { &data[off as usize..(off + len).min(size) as usize] };
                prop_assert_eq!(&got[..], want, "read of {} at {}", len, off);
                at = off + got.len() as u64;
            }
            drop(p);
            prop_assert_eq!(budget.in_use(), 0, "a closed handle kept budget");
            Ok(())
        })?;
    }
}
