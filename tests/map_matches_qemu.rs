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

/// Allocated data clusters whose bytes are a hole in the image file:
/// qemu-img asks the file's block status and reports them as
/// `"zero": true, "data": true` (splitting the extent at the hole).
/// The hole is punched with fallocate, so this does not depend on how
/// QEMU happened to fill copy-on-write areas.
#[test]
fn data_over_host_file_holes() {
    let mut f = Failures::new();
    for (fmt, opts) in [
        ("qcow2", "cluster_size=64k"),
        ("qcow2", "compat=0.10,cluster_size=64k"),
        ("qcow2", "cluster_size=64k,extended_l2=on"),
        ("qed", "cluster_size=64k"),
    ] {
        f.check(
            &format!("{fmt} [{opts}]"),
            catch(move || {
                let s = Scratch::new();
                let name = format!("holes.{fmt}");
                s.qemu_img(&["create", "-q", "-f", fmt, "-o", opts, &name, "1M"]);
                s.qemu_io(
                    fmt,
                    &name,
                    &["write -P 1 0 128k".into(), "write -P 2 512k 64k".into()],
                );
                // Host offset of guest 0, from qemu's own map.
                let m = s.qemu_map_json(&name);
                let v: serde_json::Value = serde_json::from_str(&m).map_err(|e| e.to_string())?;
                let host = v[0]["offset"]
                    .as_u64()
                    .ok_or("setup: no offset for guest 0")?;
                let (off, len) = ((host + 4096).to_string(), (65536 + 4096).to_string());
                let o = s.run("fallocate", &["-p", "-o", &off, "-l", &len, &name]);
                if !o.ok() {
                    return Err(format!("setup: fallocate -p failed:\n{}", o.describe()));
                }
                s.check_map(&name)
            }),
        );
    }
    f.finish();
}
