//! Consistent hashing (DestinationRule `consistentHash`): the request key's hash, and the two tables Envoy offers
//! to map it to an endpoint, ring hash and Maglev.
//!
//! Hashes are xxHash64 (seed 0), Envoy's hash for request keys and ring points, so every waypoint replica maps a
//! key to the same endpoint of the same endpoint set. Tables are built over endpoint addresses only (never over
//! their position in the config), once per snapshot and lazily, by the first request that needs them.
//!
//! `pingora-ketama` was considered for the ring: it hashes with CRC32 over nginx's ketama points, keyed only by
//! `SocketAddr`, and offers no Maglev; the ring below is as small and hashes the way Envoy does.

use std::fmt::Write as _;
use std::net::SocketAddr;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn read64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u64::from(u32::from_le_bytes(a))
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// xxHash64 (the reference algorithm, little-endian reads).
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut p = data;
    let mut h = if p.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while p.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, read64(&p[i * 8..]));
            }
            p = &p[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    while p.len() >= 8 {
        h ^= round(0, read64(p));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        p = &p[8..];
    }
    if p.len() >= 4 {
        h ^= read32(p).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        p = &p[4..];
    }
    for &b in p {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    h
}

/// A second, independent hash of a key hash: where the next probe goes when the first choice is unusable
/// (ejected, or already tried by this request).
pub fn rehash(hash: u64, attempt: u64) -> u64 {
    xxh64(&hash.to_le_bytes(), attempt)
}

/// Envoy's ring hash: every endpoint owns points on a 64-bit ring; a key goes to the owner of the first point
/// at or after its hash.
///
/// Envoy spreads `minimumRingSize` points over all endpoints, so every endpoint's share (and its points) moves
/// whenever the endpoint count changes. Here every endpoint gets `minimumRingSize` points of its own (fewer
/// only beyond 256 endpoints, to bound the ring at 2¹⁸ points), so an endpoint's points depend on its address
/// alone: removing one endpoint moves exactly its keys, adding one takes keys only for itself.
#[derive(Debug)]
pub struct Ring {
    /// (point hash, member index), sorted by hash.
    points: Vec<(u64, u32)>,
}

/// Bound on the ring's points (16 bytes each).
const MAX_RING: usize = 1 << 18;

impl Ring {
    pub fn build(members: &[SocketAddr], min_size: usize) -> Ring {
        if members.is_empty() {
            return Ring { points: Vec::new() };
        }
        let per = min_size.clamp(1, (MAX_RING / members.len()).max(1));
        let mut points = Vec::with_capacity(per * members.len());
        let mut name = String::with_capacity(48);
        for (m, addr) in members.iter().enumerate() {
            for i in 0..per {
                name.clear();
                // Envoy's point key: the endpoint's address, `_`, the point's index.
                let _ = write!(name, "{addr}_{i}");
                points.push((xxh64(name.as_bytes(), 0), m as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Members in ring order starting at the key's point: the first is the key's endpoint, the rest are where
    /// it goes when earlier ones cannot take it (Envoy walks the ring the same way). Repeats members.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = u32> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        let n = self.points.len();
        (0..n).map(move |i| self.points[(start + i) % n].1)
    }
}

/// Maglev (Eisenbud et al., NSDI 2016, §3.4): a lookup table of prime size M filled by letting the members take
/// turns claiming their next preferred free slot, each member's preference list being the permutation
/// `(offset + j·skip) mod M`. Every member ends up with ⌊M/N⌋ or ⌈M/N⌉ slots, and removing one member mostly
/// reassigns only its own slots.
#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
}

/// Envoy's upper bound for `table_size`.
const MAX_MAGLEV: usize = 5_000_011;

impl Maglev {
    pub fn build(members: &[SocketAddr], table_size: usize) -> Maglev {
        let n = members.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        // The permutation only visits every slot when M is prime; the config asks for a prime, this makes sure.
        let m = next_prime(table_size.clamp(7, MAX_MAGLEV)) as u64;
        let mut name = String::with_capacity(48);
        let mut offset = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        for addr in members {
            name.clear();
            let _ = write!(name, "{addr}");
            offset.push(xxh64(name.as_bytes(), 0) % m);
            skip.push(xxh64(name.as_bytes(), 1) % (m - 1) + 1);
        }
        // Members take turns in address order, not config order, so replicas with the same endpoints in another
        // order build the same table.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|i| members[*i]);
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for &i in &order {
                let mut slot = (offset[i] + next[i] * skip[i]) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset[i] + next[i] * skip[i]) % m;
                }
                table[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn lookup(&self, hash: u64) -> Option<u32> {
        let len = self.table.len() as u64;
        (len > 0).then(|| self.table[(hash % len) as usize])
    }
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn next_prime(mut n: usize) -> usize {
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn xxh64_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // Longer than one 32-byte stripe.
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    fn key_hashes(n: usize) -> Vec<u64> {
        (0..n).map(|i| xxh64(format!("user-{i}").as_bytes(), 0)).collect()
    }

    /// Fraction of keys whose endpoint changes when the last of `n` endpoints is removed.
    fn moved<F: Fn(&[SocketAddr]) -> Box<dyn Fn(u64) -> SocketAddr>>(n: usize, table: F) -> f64 {
        let all = addrs(n);
        let before = table(&all);
        let after = table(&all[..n - 1]);
        let keys = key_hashes(10_000);
        let moved = keys.iter().filter(|k| before(**k) != after(**k)).count();
        moved as f64 / keys.len() as f64
    }

    fn ring_table(a: &[SocketAddr]) -> Box<dyn Fn(u64) -> SocketAddr> {
        let ring = Ring::build(a, 1024);
        let a = a.to_vec();
        Box::new(move |h| a[ring.walk(h).next().unwrap() as usize])
    }

    fn maglev_table(a: &[SocketAddr]) -> Box<dyn Fn(u64) -> SocketAddr> {
        let m = Maglev::build(a, 65537);
        let a = a.to_vec();
        Box::new(move |h| a[m.lookup(h).unwrap() as usize])
    }

    #[test]
    fn ring_keys_of_remaining_endpoints_never_move() {
        let all = addrs(4);
        let (before, after) = (Ring::build(&all, 1024), Ring::build(&all[..3], 1024));
        for k in key_hashes(10_000) {
            let was = before.walk(k).next().unwrap();
            if was != 3 {
                assert_eq!(after.walk(k).next().unwrap(), was);
            }
        }
    }

    #[test]
    fn ring_removing_one_of_n_moves_about_one_nth_of_the_keys() {
        for n in [3, 4, 5, 10, 20] {
            let f = moved(n, ring_table);
            assert!(f < 2.0 / n as f64, "n={n}: {f} of keys moved");
            assert!(
                f > 0.3 / n as f64,
                "n={n}: only {f} moved (the removed endpoint's keys must move)"
            );
        }
    }

    #[test]
    fn maglev_removing_one_of_n_moves_about_one_nth_of_the_keys() {
        for n in [3, 4, 5, 10, 20] {
            let f = moved(n, maglev_table);
            assert!(f < 2.0 / n as f64, "n={n}: {f} of keys moved");
            assert!(f > 0.3 / n as f64, "n={n}: only {f} moved");
        }
    }

    #[test]
    fn same_key_same_endpoint_and_spread_is_even() {
        let a = addrs(8);
        let ring = ring_table(&a);
        let maglev = maglev_table(&a);
        let keys = key_hashes(10_000);
        for k in &keys[..100] {
            assert_eq!(ring(*k), ring(*k));
            assert_eq!(maglev(*k), maglev(*k));
        }
        // Maglev's table is balanced to one slot; the ring within a few percent. 10 000 keys over 8 endpoints:
        // 1250 expected each, allow ±40% for the ring's point variance and sampling.
        for table in [ring, maglev] {
            let mut counts = std::collections::HashMap::new();
            for k in &keys {
                *counts.entry(table(*k)).or_insert(0usize) += 1;
            }
            assert_eq!(counts.len(), 8);
            for c in counts.values() {
                assert!((750..=1750).contains(c), "{counts:?}");
            }
        }
    }

    #[test]
    fn maglev_slots_are_balanced_and_table_prime() {
        let a = addrs(7);
        let m = Maglev::build(&a, 65536);
        assert_eq!(m.len(), 65537, "rounded up to a prime");
        let mut counts = [0usize; 7];
        for s in &m.table {
            counts[*s as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
    }

    #[test]
    fn ring_walk_visits_other_members() {
        let a = addrs(3);
        let ring = Ring::build(&a, 16);
        let seen: std::collections::HashSet<u32> = ring.walk(12345).collect();
        assert_eq!(seen.len(), 3);
        assert!(Ring::build(&[], 1024).walk(1).next().is_none());
    }
}
