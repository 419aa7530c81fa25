//! `info`: the fields of `imgpull info --output json` (and of each element
//! of `--backing-chain`) equal qemu-img's: `filename`, `format`,
//! `virtual-size`, `cluster-size`, `backing-filename`,
//! `full-backing-filename`, `backing-filename-format`, `dirty-flag`, and
//! the whole `format-specific` object. Relative backing names are checked
//! from several working directories.

mod common;

use std::path::Path;

use common::cases::Fmt;
use common::{catch, get_be64, get_le64, put_be32, put_le64, Failures, Layer, Rng, Scratch, MIB};
use serde_json::Value;

/// The keys compared (absent on one side and present on the other is a
/// difference too).
const KEYS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "format-specific",
];

fn compare_one(what: &str, q: &Value, o: &Value) -> Result<(), String> {
    let mut diffs = String::new();
    for k in KEYS {
        if q.get(k) != o.get(k) {
            diffs += &format!(
                "  {what}: key {k:?}: qemu-img {}, imgpull {}\n",
                q.get(k).map_or("(absent)".into(), |v| v.to_string()),
                o.get(k).map_or("(absent)".into(), |v| v.to_string())
            );
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs)
    }
}

/// Compare `imgpull info --output json [--backing-chain] FILE` with qemu-img
/// when run in `cwd` (relative to the scratch dir).
fn check_info_in(s: &Scratch, cwd: &Path, file: &str, chain: bool) -> Result<(), String> {
    let mut qargs = vec!["info", "--output=json"];
    let mut oargs = vec!["info", "--output", "json"];
    if chain {
        qargs.push("--backing-chain");
        oargs.push("--backing-chain");
    }
    qargs.push(file);
    oargs.push(file);
    let q = s.run_in(cwd, "qemu-img", &qargs, common::CMD_TIMEOUT);
    if !q.ok() {
        return Err(format!(
            "qemu-img info failed:\n{}\n{}",
            q.describe(),
            s.reproducer()
        ));
    }
    let o = s.imgpull_in(cwd, &oargs);
    if !o.ok() {
        return Err(format!(
            "imgpull info failed:\n{}\n{}",
            o.describe(),
            s.reproducer()
        ));
    }
    let qv: Value = serde_json::from_str(&q.stdout).map_err(|e| format!("qemu JSON: {e}"))?;
    let ov: Value = serde_json::from_str(&o.stdout).map_err(|e| {
        format!(
            "imgpull info printed invalid JSON ({e}):\n{}\n{}",
            o.stdout,
            s.reproducer()
        )
    })?;
    let r = if chain {
        match (qv.as_array(), ov.as_array()) {
            (Some(qa), Some(oa)) if qa.len() == oa.len() => {
                let mut diffs = String::new();
                for (i, (a, b)) in qa.iter().zip(oa).enumerate() {
                    if let Err(d) = compare_one(&format!("chain element {i}"), a, b) {
                        diffs += &d;
                    }
                }
                if diffs.is_empty() {
                    Ok(())
                } else {
                    Err(diffs)
                }
            }
            _ => Err(format!(
                "--backing-chain: qemu-img gives {} elements, imgpull {}\n",
                qv.as_array().map_or(0, Vec::len),
                ov.as_array().map_or(0, Vec::len)
            )),
        }
    } else {
        compare_one("image", &qv, &ov)
    };
    r.map_err(|d| format!("info of {file} differs:\n{d}{}", s.reproducer()))
}

fn check_info(s: &Scratch, file: &str) -> Result<(), String> {
    check_info_in(s, s.dir(), file, false)?;
    check_info_in(s, s.dir(), file, true)
}

/// Single images across formats and options.
#[test]
fn single_images() {
    let fmts = [
        Fmt::qcow2(""),
        Fmt::qcow2("compat=0.10"),
        Fmt::qcow2("compat=0.10,cluster_size=4k,refcount_bits=16"),
        Fmt::qcow2("cluster_size=512"),
        Fmt::qcow2("cluster_size=2M"),
        Fmt::qcow2("refcount_bits=1"),
        Fmt::qcow2("refcount_bits=64"),
        Fmt::qcow2("extended_l2=on"),
        Fmt::qcow2("extended_l2=on,cluster_size=32k"),
        Fmt::qcow2("compression_type=zstd"),
        Fmt::qcow2("lazy_refcounts=on"),
        Fmt::qcow2("preallocation=metadata,cluster_size=4k"),
        Fmt::qed(""),
        Fmt::qed("cluster_size=4k,table_size=2"),
        Fmt::qed("cluster_size=1M,table_size=16"),
        Fmt::raw(),
    ];
    let mut f = Failures::new();
    for (i, fm) in fmts.iter().enumerate() {
        let fm = fm.clone();
        let r = catch(move || {
            let s = Scratch::new();
            let l = fm.layer(
                &format!("img.{}", fm.ext()),
                3 * MIB + 512,
                &mut Rng::new(i as u64),
                4,
            );
            let top = s.build_chain(&[l]);
            check_info(&s, &top)
        });
        f.check(&format!("{} [{}]", fmts[i].fmt, fmts[i].opts), r);
    }
    f.finish();
}

/// Overlays: relative, absolute and `./` backing names, every format pair,
/// --backing-chain of depth 3 and 4.
#[test]
fn overlays_and_backing_chains() {
    let mut f = Failures::new();
    let pairs = [
        (Fmt::raw(), Fmt::qcow2("")),
        (Fmt::raw(), Fmt::qed("")),
        (Fmt::qcow2(""), Fmt::qcow2("compat=0.10")),
        (Fmt::qcow2("cluster_size=4k"), Fmt::qed("")),
        (Fmt::qed(""), Fmt::qcow2("extended_l2=on")),
        (Fmt::qed(""), Fmt::qed("cluster_size=4k,table_size=4")),
    ];
    for (i, (b, t)) in pairs.iter().enumerate() {
        let (b, t) = (b.clone(), t.clone());
        let name = format!("{} under {} [{}]", b.fmt, t.fmt, t.opts);
        f.check(
            &name,
            catch(move || {
                let s = Scratch::new();
                let mut rng = Rng::new(50 + i as u64);
                let base = b.layer(&format!("base.{}", b.ext()), 2 * MIB, &mut rng, 3);
                let top = t.layer(&format!("top.{}", t.ext()), 4 * MIB, &mut rng, 3);
                let top = s.build_chain(&[base, top]);
                check_info(&s, &top)
            }),
        );
    }
    f.check(
        "absolute and ./ backing names",
        catch(|| {
            let s = Scratch::new();
            s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
            let abs = s.path("base.qcow2").display().to_string();
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &abs,
                "-F",
                "qcow2",
                "abs.qcow2",
            ]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qed",
                "-b",
                "./base.qcow2",
                "-F",
                "qcow2",
                "dot.qed",
            ]);
            check_info(&s, "abs.qcow2")?;
            check_info(&s, "dot.qed")
        }),
    );
    f.check(
        "depth 4 mixed chain",
        catch(|| {
            let s = Scratch::new();
            let mut rng = Rng::new(77);
            let layers = vec![
                Fmt::raw().layer("l0.raw", MIB, &mut rng, 2),
                Fmt::qed("cluster_size=4k,table_size=4").layer("l1.qed", 2 * MIB, &mut rng, 2),
                Fmt::qcow2("compat=0.10").layer("l2.qcow2", 2 * MIB, &mut rng, 2),
                Fmt::qcow2("extended_l2=on").layer("l3.qcow2", 3 * MIB, &mut rng, 2),
            ];
            let top = s.build_chain(&layers);
            check_info(&s, &top)
        }),
    );
    f.finish();
}

/// Images without a recorded backing format (the backing is probed), and
/// QED's BACKING_FORMAT_NO_PROBE.
#[test]
fn backing_format_absent_or_probed() {
    let mut f = Failures::new();
    for (ver, bfmt) in [("1.1", "qcow2"), ("0.10", "raw"), ("1.1", "qed")] {
        f.check(
            &format!("qcow2 compat={ver} without backing format over {bfmt}"),
            catch(move || {
                let s = Scratch::new();
                let base = format!("base.{bfmt}");
                s.qemu_img(&["create", "-q", "-f", bfmt, &base, "1M"]);
                s.qemu_io(bfmt, &base, &["write -P 9 4096 4096".into()]);
                s.qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={ver}"),
                    "-b",
                    &base,
                    "-F",
                    bfmt,
                    "top.qcow2",
                ]);
                // Rename the backing-format extension to an unknown type:
                // qemu then probes, and the unknown extension stays.
                let p = s.path("top.qcow2");
                let off = common::qcow2_extension(&p, 0xE279_2ACA)
                    .ok_or("no backing format extension")?;
                put_be32(&p, off, 0x1234_5678);
                s.note(format!(
                    "printf '\\x12\\x34\\x56\\x78' | dd of=top.qcow2 bs=1 seek={off} conv=notrunc"
                ));
                check_info(&s, "top.qcow2")?;
                s.check_map("top.qcow2")
            }),
        );
    }
    for bfmt in ["raw", "qcow2"] {
        f.check(
            &format!("qed over {bfmt}"),
            catch(move || {
                let s = Scratch::new();
                let base = format!("base.{bfmt}");
                s.qemu_img(&["create", "-q", "-f", bfmt, &base, "1M"]);
                s.qemu_io(bfmt, &base, &["write -P 9 0 4096".into()]);
                s.qemu_img(&[
                    "create", "-q", "-f", "qed", "-b", &base, "-F", bfmt, "top.qed",
                ]);
                check_info(&s, "top.qed")?;
                s.check_map("top.qed")
            }),
        );
    }
    f.finish();
}

/// Dirty images: qcow2 lazy refcounts left dirty by a crash (qemu-io
/// abort), QED with NEED_CHECK set.
#[test]
fn dirty_flag() {
    let mut f = Failures::new();
    f.check(
        "qcow2 lazy_refcounts dirty",
        catch(|| {
            let s = Scratch::new();
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on,cluster_size=4k",
                "d.qcow2",
                "1M",
            ]);
            // qemu-io exits on SIGABRT here, leaving the dirty bit set.
            let _ = s.run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 1 0 8k",
                    "-c",
                    "abort",
                    "d.qcow2",
                ],
            );
            let incompat = get_be64(&s.path("d.qcow2"), 72);
            if incompat & 1 == 0 {
                return Err("setup: qemu-io abort left no dirty bit".into());
            }
            check_info(&s, "d.qcow2")?;
            s.check_map("d.qcow2")
        }),
    );
    f.check(
        "qed NEED_CHECK",
        catch(|| {
            let s = Scratch::new();
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qed",
                "-o",
                "cluster_size=4k,table_size=4",
                "d.qed",
                "1M",
            ]);
            s.qemu_io("qed", "d.qed", &["write -P 1 0 8k".into()]);
            let p = s.path("d.qed");
            let features = get_le64(&p, 16);
            put_le64(&p, 16, features | 2);
            s.note("# set QED_F_NEED_CHECK: features |= 2 (LE u64 at offset 16)");
            check_info(&s, "d.qed")?;
            s.check_map("d.qed")
        }),
    );
    f.finish();
}

/// A relative backing name across directories ("../b/base.qcow2"), with
/// the image opened by relative paths from different working directories:
/// info (also --backing-chain) and both map outputs must agree.
#[test]
fn relative_backing_across_directories() {
    let mut f = Failures::new();
    f.check(
        "a/top.qcow2 -> ../b/base.qcow2 -> c.qed",
        catch(|| {
            let s = Scratch::new();
            for d in ["a", "b", "c"] {
                std::fs::create_dir(s.path(d)).map_err(|e| e.to_string())?;
                s.note(format!("mkdir {d}"));
            }
            s.qemu_img(&["create", "-q", "-f", "qed", "c/low.qed", "2M"]);
            s.qemu_io("qed", "c/low.qed", &["write -P 5 1M 64k".into()]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "../c/low.qed",
                "-F",
                "qed",
                "b/base.qcow2",
            ]);
            s.qemu_io("qcow2", "b/base.qcow2", &["write -P 1 0 64k".into()]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "../b/base.qcow2",
                "-F",
                "qcow2",
                "a/top.qcow2",
            ]);
            s.qemu_io("qcow2", "a/top.qcow2", &["write -P 2 128k 64k".into()]);
            let a = s.path("a");
            let b = s.path("b");
            for (cwd, file) in [
                (s.dir(), "a/top.qcow2"),
                (a.as_path(), "top.qcow2"),
                (a.as_path(), "./top.qcow2"),
                (b.as_path(), "../a/top.qcow2"),
            ] {
                check_info_in(&s, cwd, file, false)?;
                check_info_in(&s, cwd, file, true)?;
                for json in [true, false] {
                    let (qa, oa): (Vec<&str>, Vec<&str>) = if json {
                        (
                            vec!["map", "--output=json", file],
                            vec!["map", "--output", "json", file],
                        )
                    } else {
                        (vec!["map", file], vec!["map", file])
                    };
                    let q = s.run_in(cwd, "qemu-img", &qa, common::CMD_TIMEOUT);
                    let o = s.imgpull_in(cwd, &oa);
                    if !q.ok() || !o.ok() || q.stdout != o.stdout {
                        return Err(format!(
                            "map differs when run in {}:\n{}\n{}\n{}\n{}",
                            cwd.display(),
                            q.describe(),
                            o.describe(),
                            common::diff_text(&q.stdout, &o.stdout),
                            s.reproducer()
                        ));
                    }
                }
            }
            Ok(())
        }),
    );
    f.check(
        "absolute top path",
        catch(|| {
            let s = Scratch::new();
            std::fs::create_dir(s.path("d")).map_err(|e| e.to_string())?;
            s.note("mkdir d");
            s.build_chain(&[Layer::new("d/base.qcow2", "qcow2", MIB)]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "d/top.qcow2",
            ]);
            let abs = s.path("d/top.qcow2").display().to_string();
            check_info_in(&s, s.dir(), &abs, true)
        }),
    );
    f.finish();
}
