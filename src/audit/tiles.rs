//! Subtree hashes kept in memory, so a proof costs O(log n) hashes and at
//! most two reads of [`TILE`] leaf hashes, instead of loading every leaf.
//!
//! Owns: the hashes of every complete, aligned subtree of [`TILE`] leaves and
//! of every complete, aligned subtree above those (as in a tiled
//! transparency log: ~64 bytes per 256 entries), the leaves after the last
//! complete tile, and RFC 9162 inclusion and consistency proofs computed from
//! them. Leaves inside an older partial tile are read through a callback.
//! Produces exactly what `merkle::inclusion_proof`/`consistency_proof` do
//! over the whole leaf list (tested). Must not: touch storage itself.

use super::merkle::{empty_root, node_hash, root, Hash};
use super::AuditError;

/// Leaves per tile (a power of two).
pub(crate) const TILE: u64 = 256;

/// Reads the leaf hashes `a..b` (at most one tile) from storage.
pub(crate) type ReadLeaves<'a> = dyn FnMut(u64, u64) -> Result<Vec<Hash>, AuditError> + 'a;

/// The in-memory subtree hashes of a log.
#[derive(Debug, Clone, Default)]
pub struct Tiles {
    /// `levels[j][i]`: the root of leaves `i*TILE*2^j .. (i+1)*TILE*2^j`.
    levels: Vec<Vec<Hash>>,
    /// Leaves after the last complete tile.
    tail: Vec<Hash>,
}

fn split(n: u64) -> u64 {
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

impl Tiles {
    /// Builds the tiles of an existing log.
    pub fn from_leaves(leaves: &[Hash]) -> Self {
        let mut t = Tiles::default();
        for l in leaves {
            t.push(*l);
        }
        t
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        self.tail.push(leaf);
        if self.tail.len() as u64 == TILE {
            let mut h = root(&self.tail);
            self.tail.clear();
            let mut j = 0;
            loop {
                if self.levels.len() == j {
                    self.levels.push(Vec::new());
                }
                self.levels[j].push(h);
                let n = self.levels[j].len();
                if n % 2 == 1 {
                    break;
                }
                h = node_hash(&self.levels[j][n - 2], &self.levels[j][n - 1]);
                j += 1;
            }
        }
    }

    /// Leaves covered.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64) * TILE + self.tail.len() as u64
    }

    /// MTH(D[a:b]) for a range the recursion of RFC 9162 produces (`a` is a
    /// multiple of the largest power of two not above `b - a`).
    fn mth(&self, a: u64, b: u64, read: &mut ReadLeaves<'_>) -> Result<Hash, AuditError> {
        let n = b - a;
        if n == 0 {
            return Ok(empty_root());
        }
        if n.is_power_of_two() && n >= TILE && a.is_multiple_of(n) {
            let j = (n / TILE).trailing_zeros() as usize;
            if let Some(h) = self.levels.get(j).and_then(|l| l.get((a / n) as usize)) {
                return Ok(*h);
            }
        }
        if n <= TILE {
            let full = self.size() - self.tail.len() as u64;
            if a >= full {
                let (s, e) = ((a - full) as usize, (b - full) as usize);
                return Ok(root(&self.tail[s..e]));
            }
            let leaves = read(a, b)?;
            if leaves.len() as u64 != n {
                return Err(AuditError::Integrity(format!(
                    "the store holds {} leaves in {a}..{b}",
                    leaves.len()
                )));
            }
            return Ok(root(&leaves));
        }
        let k = split(n);
        Ok(node_hash(
            &self.mth(a, a + k, read)?,
            &self.mth(a + k, b, read)?,
        ))
    }

    fn path(
        &self,
        m: u64,
        a: u64,
        b: u64,
        read: &mut ReadLeaves<'_>,
    ) -> Result<Vec<Hash>, AuditError> {
        let n = b - a;
        if n <= 1 {
            return Ok(Vec::new());
        }
        let k = split(n);
        Ok(if m < k {
            let mut p = self.path(m, a, a + k, read)?;
            p.push(self.mth(a + k, b, read)?);
            p
        } else {
            let mut p = self.path(m - k, a + k, b, read)?;
            p.push(self.mth(a, a + k, read)?);
            p
        })
    }

    /// The audit path for leaf `m` in the tree of the first `size` leaves.
    pub fn inclusion_proof(
        &self,
        m: u64,
        size: u64,
        read: &mut ReadLeaves<'_>,
    ) -> Result<Vec<Hash>, AuditError> {
        if size > self.size() {
            return Err(AuditError::BadRequest(format!(
                "tree size {size} is beyond the log ({})",
                self.size()
            )));
        }
        if m >= size {
            return Ok(Vec::new());
        }
        self.path(m, 0, size, read)
    }

    /// The root of the tree of the first `size` leaves.
    pub fn root(&self, size: u64, read: &mut ReadLeaves<'_>) -> Result<Hash, AuditError> {
        if size > self.size() {
            return Err(AuditError::BadRequest(format!(
                "tree size {size} is beyond the log ({})",
                self.size()
            )));
        }
        // MTH(D[0:size]) splits into aligned subtrees, as `mth` requires.
        self.mth(0, size, read)
    }

    fn subproof(
        &self,
        m: u64,
        a: u64,
        b: u64,
        whole: bool,
        read: &mut ReadLeaves<'_>,
    ) -> Result<Vec<Hash>, AuditError> {
        let n = b - a;
        if m == n {
            return Ok(if whole {
                Vec::new()
            } else {
                vec![self.mth(a, b, read)?]
            });
        }
        let k = split(n);
        Ok(if m <= k {
            let mut p = self.subproof(m, a, a + k, whole, read)?;
            p.push(self.mth(a + k, b, read)?);
            p
        } else {
            let mut p = self.subproof(m - k, a + k, b, false, read)?;
            p.push(self.mth(a, a + k, read)?);
            p
        })
    }

    /// The consistency proof from size `m` to size `n`.
    pub fn consistency_proof(
        &self,
        m: u64,
        n: u64,
        read: &mut ReadLeaves<'_>,
    ) -> Result<Vec<Hash>, AuditError> {
        if n > self.size() {
            return Err(AuditError::BadRequest(format!(
                "tree size {n} is beyond the log ({})",
                self.size()
            )));
        }
        if m == 0 || m >= n {
            return Ok(Vec::new());
        }
        self.subproof(m, 0, n, true, read)
    }
}

#[cfg(test)]
mod tests {
    use super::super::merkle::{self, leaf_hash};
    use super::*;

    #[test]
    fn proofs_from_tiles_equal_proofs_from_all_leaves() {
        let leaves: Vec<Hash> = (0..1300u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let tiles = Tiles::from_leaves(&leaves);
        assert_eq!(tiles.size(), 1300);
        let mut reads = 0;
        let mut read = |a: u64, b: u64| {
            assert!(b - a <= TILE, "reads at most a tile");
            reads += 1;
            Ok(leaves[a as usize..b as usize].to_vec())
        };
        for size in [
            1u64, 2, 3, 255, 256, 257, 511, 512, 513, 700, 1024, 1025, 1299, 1300,
        ] {
            let all = &leaves[..size as usize];
            assert_eq!(
                tiles.root(size, &mut read).unwrap(),
                merkle::root(all),
                "root {size}"
            );
            for m in [0, 1, size / 3, size / 2, size.saturating_sub(2), size - 1] {
                assert_eq!(
                    tiles.inclusion_proof(m, size, &mut read).unwrap(),
                    merkle::inclusion_proof(m as usize, all),
                    "inclusion {m} in {size}"
                );
                if m > 0 {
                    assert_eq!(
                        tiles.consistency_proof(m, size, &mut read).unwrap(),
                        merkle::consistency_proof(m as usize, all),
                        "consistency {m} -> {size}"
                    );
                }
            }
        }
        assert!(tiles.inclusion_proof(0, 1301, &mut read).is_err());
        assert!(reads > 0);
    }
}
