//! `read`: the guest bytes read through [`imgpull_chain::Chain::read`] over
//! the whole virtual size equal `qemu-img convert -O raw` of the top image,
//! for several request sizes and alignments.

mod common;

use common::cases::{self, Case};
use common::{catch, first_difference, read_through_chain, Failures, Scratch, MIB};

/// (chunk size, size of a first unaligned request) pairs.
const PATTERNS: &[(usize, usize)] = &[
    (usize::MAX, 0),
    (65536 + 512, 0),
    (777_777, 4097),
    (4096, 1),
];

fn run_cases(cases: Vec<Case>) {
    let mut f = Failures::new();
    for case in cases {
        let name = case.name.clone();
        let r = catch(move || {
            let s = Scratch::new();
            let top = s.build_chain(&case.layers);
            let want = s.qemu_raw_bytes(&top);
            let path = s.path(&top);
            let size = want.len() as u64;
            for &(chunk, first) in PATTERNS {
                // Small requests over big images cost time, not coverage.
                if (chunk < 65536 && size > 4 * MIB) || (chunk == 65536 + 512 && size > 8 * MIB) {
                    continue;
                }
                let got = read_through_chain(&path, chunk, first)
                    .map_err(|e| format!("{e}\n{}", s.reproducer()))?;
                if let Some(at) = first_difference(&want, &got) {
                    return Err(format!(
                        "Chain::read (chunk {chunk}, first request {first}) differs from \
                         qemu-img convert -O raw {top} at byte {at} (virtual size {size}, ours {}): \
                         want {:?}, got {:?}\n{}",
                        got.len(),
                        want.get(at..(at + 16).min(want.len())),
                        got.get(at..(at + 16).min(got.len())),
                        s.reproducer()
                    ));
                }
            }
            Ok(())
        });
        f.check(&name, r);
    }
    f.finish();
}

#[test]
fn qcow2_cluster_sizes() {
    run_cases(cases::qcow2_cluster_sizes());
}

#[test]
fn qcow2_v2_refcounts_lazy() {
    let mut v = cases::qcow2_v2();
    v.extend(cases::qcow2_refcount_bits());
    v.extend(cases::qcow2_lazy_refcounts());
    run_cases(v);
}

#[test]
fn qcow2_extended_l2() {
    run_cases(cases::qcow2_extended_l2());
}

#[test]
fn qcow2_compressed_zlib_and_zstd() {
    run_cases(cases::qcow2_compression());
}

#[test]
fn qcow2_preallocation() {
    run_cases(cases::qcow2_preallocation());
}

#[test]
fn qed_cluster_and_table_sizes() {
    run_cases(cases::qed_matrix());
}

#[test]
fn raw_bases_with_holes() {
    run_cases(cases::raw_bases());
}

#[test]
fn mixed_formats_depth_1_to_5() {
    run_cases(cases::mixed_depths());
}

#[test]
fn backings_shorter_and_longer() {
    run_cases(cases::backing_sizes());
}
