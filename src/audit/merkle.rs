//! RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.
//!
//! Owns: the hash definitions (leaf `SHA-256(0x00 || entry)`, node
//! `SHA-256(0x01 || left || right)`), an append-only [`Frontier`] that gives
//! the root in O(log n) per append, inclusion/consistency proof generation
//! over a slice of leaf hashes (RFC 9162 §2.1.3.1, §2.1.4.1) and their
//! verification (§2.1.3.2, §2.1.4.2). Pure functions; no storage.

use ring::digest::{Context, SHA256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut c = Context::new(&SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// The hash of an empty tree: `SHA-256()`.
pub(crate) fn empty_root() -> Hash {
    sha256(&[])
}

/// `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    sha256(&[&[0u8], entry])
}

/// `SHA-256(0x01 || left || right)`.
pub(crate) fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1u8], left, right])
}

/// The largest power of two strictly smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH over leaf hashes (RFC 9162 §2.1.1).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path for leaf `m` in the tree of `leaves` (RFC 9162 §2.1.3.1).
pub fn inclusion_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || m >= n {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = inclusion_proof(m, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(m - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// The consistency proof from size `m` to `leaves.len()` (RFC 9162 §2.1.4.1).
pub(crate) fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    if m == 0 || m >= leaves.len() {
        return Vec::new();
    }
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![root(leaves)]
        };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Why a proof failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The index is not in the tree.
    #[error("leaf index {0} is not below tree size {1}")]
    IndexOutOfRange(u64, u64),
    /// The sizes are not ordered.
    #[error("consistency needs 0 < first ({0}) <= second ({1})")]
    BadSizes(u64, u64),
    /// The proof has the wrong length or does not hash to the root.
    #[error("the proof does not match the root")]
    Mismatch,
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if leaf_index >= tree_size {
        return Err(ProofError::IndexOutOfRange(leaf_index, tree_size));
    }
    let (mut fn_, mut sn) = (leaf_index, tree_size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::Mismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn == 0 && r == *root {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

/// Verifies a consistency proof (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first == 0 || first > second {
        return Err(ProofError::BadSizes(first, second));
    }
    if first == second {
        return if proof.is_empty() && first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((head, rest)) = path.split_first() else {
        return Err(ProofError::Mismatch);
    };
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*head, *head);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::Mismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if fr == *first_root && sr == *second_root && sn == 0 {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

/// An append-only tree summary: the roots of the perfect subtrees that make
/// up the tree, left to right. Appending is O(log n) amortized; so is the root.
#[derive(Debug, Clone, Default)]
pub(crate) struct Frontier {
    size: u64,
    /// (subtree size, subtree root), sizes strictly decreasing.
    nodes: Vec<(u64, Hash)>,
}

impl Frontier {
    /// Builds a frontier over existing leaf hashes.
    pub(crate) fn from_leaves(leaves: &[Hash]) -> Self {
        let mut f = Self::default();
        for l in leaves {
            f.push(*l);
        }
        f
    }

    /// Appends a leaf hash.
    pub(crate) fn push(&mut self, leaf: Hash) {
        self.size += 1;
        self.nodes.push((1, leaf));
        while self.nodes.len() >= 2 {
            let n = self.nodes.len();
            if self.nodes[n - 1].0 != self.nodes[n - 2].0 {
                break;
            }
            let (s, right) = self.nodes.pop().expect("len >= 2");
            let (_, left) = self.nodes.pop().expect("len >= 2");
            self.nodes.push((s * 2, node_hash(&left, &right)));
        }
    }

    /// Number of leaves.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The tree root (MTH).
    pub(crate) fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some((_, last)) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, (_, left)| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    /// MTH exactly as RFC 9162 writes it, over raw entries.
    fn brute_root(entries: &[Vec<u8>]) -> Hash {
        match entries.len() {
            0 => sha256(&[]),
            1 => sha256(&[&[0], &entries[0]]),
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                sha256(&[&[1], &brute_root(&entries[..k]), &brute_root(&entries[k..])])
            }
        }
    }

    #[test]
    fn known_vectors() {
        // SHA-256 of the empty string, and of the single byte 0x00.
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        // Two leaves: node over the two leaf hashes.
        let l = leaves(2);
        assert_eq!(root(&l), node_hash(&l[0], &l[1]));
    }

    #[test]
    fn frontier_and_recursive_root_match_brute_force_up_to_300() {
        let mut entries = Vec::new();
        let mut f = Frontier::default();
        assert_eq!(f.root(), brute_root(&entries));
        for i in 0..300 {
            let e = format!("entry {i}").into_bytes();
            f.push(leaf_hash(&e));
            entries.push(e);
            let want = brute_root(&entries);
            assert_eq!(f.root(), want, "size {}", i + 1);
            assert_eq!(root(&leaves(i + 1)), want);
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_tampering_fails() {
        for n in 1..=256usize {
            let l = leaves(n);
            let r = root(&l);
            for m in 0..n {
                let p = inclusion_proof(m, &l);
                verify_inclusion(m as u64, n as u64, &l[m], &p, &r).unwrap();
                // Wrong leaf, wrong index, wrong size, shortened proof all fail.
                let other = leaf_hash(b"forged");
                assert!(verify_inclusion(m as u64, n as u64, &other, &p, &r).is_err());
                if n > 1 {
                    let wrong = ((m + 1) % n) as u64;
                    assert!(verify_inclusion(wrong, n as u64, &l[m], &p, &r).is_err());
                    // (A wrong tree size can still verify when the path has the
                    // same shape; the signed checkpoint binds size and root.)
                    assert!(verify_inclusion(m as u64, n as u64, &l[m], &p[1..], &r).is_err());
                }
            }
            assert!(verify_inclusion(n as u64, n as u64, &l[0], &[], &r).is_err());
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_tampering_fails() {
        let all = leaves(160);
        for n in 1..=160usize {
            let rn = root(&all[..n]);
            for m in 1..=n {
                let rm = root(&all[..m]);
                let p = consistency_proof(m, &all[..n]);
                verify_consistency(m as u64, n as u64, &rm, &rn, &p)
                    .unwrap_or_else(|e| panic!("{m}->{n}: {e}"));
                let bogus = leaf_hash(b"x");
                assert!(verify_consistency(m as u64, n as u64, &bogus, &rn, &p).is_err());
                assert!(verify_consistency(m as u64, n as u64, &rm, &bogus, &p).is_err());
                if !p.is_empty() {
                    let mut q = p.clone();
                    q[0][0] ^= 1;
                    assert!(verify_consistency(m as u64, n as u64, &rm, &rn, &q).is_err());
                }
            }
        }
        assert!(verify_consistency(0, 5, &empty_root(), &root(&all[..5]), &[]).is_err());
    }
}
