//! `map`: our allocation map of chains QEMU built equals `qemu-img map`
//! exactly — the library's JSON rendering, `imgpull map --output json`, and
//! the human table (`imgpull map`), except for chains with compressed
//! clusters, where qemu-img's human map fails and so must ours.

mod common;

use common::cases::{self, Case};
use common::{catch, Failures, Scratch};

fn run_cases(cases: Vec<Case>) {
    let mut f = Failures::new();
    for case in cases {
        let name = case.name.clone();
        let r = catch(move || {
            let s = Scratch::new();
            let top = s.build_chain(&case.layers);
            s.check_map(&top)
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
fn qcow2_v2_compat_0_10() {
    run_cases(cases::qcow2_v2());
}

#[test]
fn qcow2_refcount_bits() {
    run_cases(cases::qcow2_refcount_bits());
}

#[test]
fn qcow2_extended_l2() {
    run_cases(cases::qcow2_extended_l2());
}

#[test]
fn qcow2_compression() {
    run_cases(cases::qcow2_compression());
}

#[test]
fn qcow2_lazy_refcounts() {
    run_cases(cases::qcow2_lazy_refcounts());
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

/// An empty raw file: qemu-img prints one zero-length entry.
#[test]
fn empty_raw_file() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "empty.raw", "0"]);
    let mut f = Failures::new();
    f.check("empty raw", s.check_map("empty.raw"));
    f.finish();
}
