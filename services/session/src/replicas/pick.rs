//! The order in which one request tries a tier's replicas: pure functions over a snapshot of the
//! replicas, so that the policies can be tested without a network.
//!
//! - Vision (stateless): least outstanding requests first, ties broken by a rotating start, so
//!   idle replicas take turns and a slow one stops getting more than its share.
//! - LLM (affinity): rendezvous (highest random weight) hashing of the session id over the
//!   replicas: each session sticks to the replica with the highest `score(session, replica)`, so
//!   its prefix cache serves the growing prompt; a replica that leaves moves only its own
//!   sessions, each to its next-highest replica, and one that joins takes only the sessions it
//!   now scores highest for.
//!
//! Ejected replicas (failed, not yet re-admitted by their health check) come after every healthy
//! one, in the same policy's order: a last resort rather than never.

/// What picking needs to know about one replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    /// Stable identity (the replica's address): the rendezvous key.
    pub(crate) key: &'a str,
    /// Requests in flight on it now.
    pub(crate) outstanding: usize,
    pub(crate) ejected: bool,
}

/// Every candidate once, by index: healthy ones by fewest outstanding requests (ties in
/// rotation from `start`), then ejected ones likewise.
pub(crate) fn least_outstanding(candidates: &[Candidate<'_>], start: usize) -> Vec<usize> {
    let n = candidates.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&index| {
        let candidate = &candidates[index];
        let rotation = (index + n - start % n.max(1)) % n.max(1);
        (candidate.ejected, candidate.outstanding, rotation)
    });
    order
}

/// Every candidate once, by index: healthy ones by descending rendezvous score for `key`,
/// then ejected ones likewise.
pub(crate) fn rendezvous(candidates: &[Candidate<'_>], key: &str) -> Vec<usize> {
    let mut scored: Vec<(bool, std::cmp::Reverse<u64>, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(index, candidate)| {
            (
                candidate.ejected,
                std::cmp::Reverse(score(key, candidate.key)),
                index,
            )
        })
        .collect();
    scored.sort_unstable();
    scored.into_iter().map(|(_, _, index)| index).collect()
}

/// A stable 64-bit weight of (`key`, `replica`): FNV-1a over both (with a separator, so
/// "ab"+"c" differs from "a"+"bc"), then splitmix64's finaliser for avalanche. Stable across
/// processes and Rust versions (unlike `DefaultHasher`), so every session tier picks alike.
pub(crate) fn score(key: &str, replica: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in key.bytes().chain([0xff]).chain(replica.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates<'a>(keys: &'a [String], ejected: &[usize]) -> Vec<Candidate<'a>> {
        keys.iter()
            .enumerate()
            .map(|(index, key)| Candidate {
                key,
                outstanding: 0,
                ejected: ejected.contains(&index),
            })
            .collect()
    }

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:50052")).collect()
    }

    fn sessions() -> Vec<String> {
        (0..3000).map(|i| format!("session-{i:05}")).collect()
    }

    fn is_permutation(order: &[usize], n: usize) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        sorted == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn least_outstanding_prefers_the_idle_and_rotates_ties() {
        let keys = addresses(3);
        let mut c = candidates(&keys, &[]);
        // All idle: the start rotates through them.
        let firsts: Vec<usize> = (0..6).map(|s| least_outstanding(&c, s)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert!(is_permutation(&least_outstanding(&c, 7), 3));
        // A busy replica goes last whatever the rotation.
        c[1].outstanding = 3;
        c[2].outstanding = 1;
        for start in 0..3 {
            assert_eq!(least_outstanding(&c, start), vec![0, 2, 1]);
        }
    }

    #[test]
    fn ejected_replicas_come_last_in_both_policies() {
        let keys = addresses(4);
        let c = candidates(&keys, &[0, 2]);
        for start in 0..4 {
            let order = least_outstanding(&c, start);
            assert!(is_permutation(&order, 4));
            let mut healthy = order[..2].to_vec();
            healthy.sort_unstable();
            assert_eq!(healthy, vec![1, 3]);
        }
        for session in sessions().iter().take(100) {
            let order = rendezvous(&c, session);
            assert!(is_permutation(&order, 4));
            assert!(order[0] == 1 || order[0] == 3);
            assert!(order[2] == 0 || order[2] == 2);
        }
        // No healthy replica at all: every one is still tried.
        let all = candidates(&keys, &[0, 1, 2, 3]);
        assert!(is_permutation(&least_outstanding(&all, 1), 4));
        assert!(is_permutation(&rendezvous(&all, "s"), 4));
        assert!(least_outstanding(&[], 3).is_empty());
        assert!(rendezvous(&[], "s").is_empty());
    }

    #[test]
    fn rendezvous_spreads_sessions_evenly_and_sticks() {
        let keys = addresses(3);
        let c = candidates(&keys, &[]);
        let mut counts = [0usize; 3];
        for session in &sessions() {
            let order = rendezvous(&c, session);
            assert_eq!(order, rendezvous(&c, session), "stable for one session");
            counts[order[0]] += 1;
        }
        // 3000 sessions over 3 replicas: 1000 each, give or take sampling noise (sd ~26).
        for count in counts {
            assert!((850..=1150).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn a_replica_leaving_moves_only_its_own_sessions() {
        let keys = addresses(4);
        let before = candidates(&keys, &[]);
        // Replica 2 leaves the set (DNS) or is ejected: both must move the same sessions.
        let gone_keys: Vec<String> = keys
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != 2)
            .map(|(_, k)| k.clone())
            .collect();
        let after_gone = candidates(&gone_keys, &[]);
        let after_ejected = candidates(&keys, &[2]);
        let mut moved = 0;
        for session in &sessions() {
            let was = &keys[rendezvous(&before, session)[0]];
            let now_gone = &gone_keys[rendezvous(&after_gone, session)[0]];
            let now_ejected = &keys[rendezvous(&after_ejected, session)[0]];
            assert_eq!(now_gone, now_ejected, "{session}");
            if was == &keys[2] {
                moved += 1;
                // Its sessions go to their second choice.
                assert_eq!(now_gone, &keys[rendezvous(&before, session)[1]]);
            } else {
                assert_eq!(was, now_gone, "{session} moved though its replica stayed");
            }
        }
        assert!(moved > 500, "replica 2 held {moved} of 3000 sessions");
    }

    #[test]
    fn a_replica_joining_takes_only_sessions_it_now_wins() {
        let keys = addresses(3);
        let grown = addresses(4);
        let before = candidates(&keys, &[]);
        let after = candidates(&grown, &[]);
        let mut taken = 0;
        for session in &sessions() {
            let was = &keys[rendezvous(&before, session)[0]];
            let now = &grown[rendezvous(&after, session)[0]];
            if now == &grown[3] {
                taken += 1;
            } else {
                assert_eq!(was, now);
            }
        }
        assert!(
            (600..=900).contains(&taken),
            "{taken} of 3000 moved to the new replica"
        );
    }

    #[test]
    fn scores_are_stable_values() {
        // Pinned (FNV-1a + splitmix64, checked with an independent Python implementation): the
        // order must not change between builds, or sessions would move on upgrade.
        assert_eq!(score("", ""), score("", ""));
        assert_ne!(score("ab", "c"), score("a", "bc"));
        assert_eq!(
            score("session", "http://10.0.0.1:50052"),
            0xd9d1_cffb_daae_9b18
        );
    }
}
