//! Bad input: damaged headers, truncated files, unsupported features and
//! broken backing chains.
//!
//! For every case, QEMU is asked first (`qemu-img map --output=json`, with
//! a time limit: QEMU itself hangs on backing loops). Then:
//!
//! * where qemu-img accepts the file, so must we, with its exact map
//!   ([`Expect::LikeQemu`]); for the damage the issue names as an error
//!   (truncation, tables past EOF) a clear error is also accepted
//!   ([`Expect::Either`]);
//! * where qemu-img refuses, or the feature is one we deliberately do not
//!   support ([`Expect::Refuse`]), our library and CLI must fail *cleanly*:
//!   an error that names the image file and the problem (a keyword), the
//!   CLI exiting 1 (never 101 = panic, never a signal), within a time limit,
//!   and under a 1 GiB address-space limit (no gigabyte allocations driven
//!   by header fields).

mod common;

use std::time::Duration;

use common::{catch, info_diff, with_timeout, Failures, Output, Scratch};
use imgpull_chain::{render_json, Chain, ChainOptions};

/// What we must do with a damaged file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Exactly what qemu-img does: its map when it accepts, a clean error
    /// when it refuses.
    LikeQemu,
    /// qemu-img's map, or a clean error (damage the issue lists as an
    /// error but QEMU tolerates when only reading).
    Either,
    /// A clean error whatever QEMU does (unsupported features, pseudo
    /// backing names).
    Refuse,
}

/// One bad-input case.
struct Case {
    name: String,
    /// Builds the file(s); returns the name of the image to open.
    build: Box<dyn Fn(&Scratch) -> String + Send>,
    expect: Expect,
    /// The error must contain one of these (case-insensitive).
    keywords: &'static [&'static str],
    /// The error must name one of these files (default: the image opened).
    culprits: Vec<&'static str>,
    /// The problem is below the top image (info without --backing-chain
    /// legitimately succeeds).
    in_chain: bool,
}

fn case(
    name: impl Into<String>,
    expect: Expect,
    keywords: &'static [&'static str],
    build: impl Fn(&Scratch) -> String + Send + 'static,
) -> Case {
    Case {
        name: name.into(),
        build: Box::new(build),
        expect,
        keywords,
        culprits: Vec::new(),
        in_chain: false,
    }
}

fn contains_any(text: &str, words: &[&str]) -> bool {
    let t = text.to_lowercase();
    words.iter().any(|w| t.contains(&w.to_lowercase()))
}

/// A clean CLI failure: exit 1 and a message naming a culprit and a
/// keyword.
fn clean_cli_error(o: &Output, culprits: &[&str], keywords: &[&str]) -> Result<(), String> {
    match o.code() {
        Some(1) => {}
        Some(101) => return Err(format!("imgpull PANICKED (exit 101):\n{}", o.describe())),
        Some(c) => return Err(format!("imgpull exited {c}, want 1:\n{}", o.describe())),
        None => {
            return Err(format!(
            "imgpull was killed (signal, allocation failure under the memory limit, or hang):\n{}",
            o.describe()
        ))
        }
    }
    if !contains_any(&o.stderr, culprits) {
        return Err(format!(
            "the error does not name the image (one of {culprits:?}):\n{}",
            o.describe()
        ));
    }
    if !contains_any(&o.stderr, keywords) {
        return Err(format!(
            "the error does not name the problem (one of {keywords:?}):\n{}",
            o.describe()
        ));
    }
    Ok(())
}

/// Our library's map (`Err` = its error text), with a time limit.
fn library_map(s: &Scratch, file: &str) -> Result<String, String> {
    let p = s.path(file);
    with_timeout("Chain::open + map", Duration::from_secs(30), move || {
        let chain = Chain::open(&p, &ChainOptions::default()).map_err(|e| e.to_string())?;
        chain
            .map()
            .map(|m| render_json(&m))
            .map_err(|e| e.to_string())
    })
}

fn run_case(c: &Case) -> Result<(), String> {
    let s = Scratch::new();
    let file = (c.build)(&s);
    let culprits: Vec<&str> = if c.culprits.is_empty() {
        vec![file.as_str()]
    } else {
        c.culprits.clone()
    };
    // For cases we must refuse anyway QEMU is not asked for a map (it
    // hangs on backing loops).
    let q = if c.expect == Expect::Refuse {
        Output {
            cmdline: "(qemu-img map not run: imgpull must refuse this file)".into(),
            status: None,
            stdout: String::new(),
            stderr: String::new(),
        }
    } else {
        s.run_in(
            s.dir(),
            "qemu-img",
            &["map", "--output=json", &file],
            Duration::from_secs(15),
        )
    };
    let qemu_ok = q.ok();
    let fail = |msg: String| {
        Err(format!(
            "{msg}\n(qemu-img map: {})\n{}",
            describe_short(&q),
            s.reproducer()
        ))
    };

    // The library.
    let lib = library_map(&s, &file);
    let lib_clean_err = |e: &str| -> Result<(), String> {
        if !contains_any(e, &culprits) {
            return Err(format!(
                "library error does not name the image ({culprits:?}): {e}"
            ));
        }
        if !contains_any(e, c.keywords) {
            return Err(format!(
                "library error does not name the problem ({:?}): {e}",
                c.keywords
            ));
        }
        Ok(())
    };
    let must_refuse = c.expect == Expect::Refuse || !qemu_ok;
    match (&lib, must_refuse) {
        (Ok(m), false) if *m == q.stdout => {}
        (Ok(m), false) => {
            return fail(format!(
                "qemu-img accepts the file; our map differs:\n{}",
                common::diff_text(&q.stdout, m)
            ))
        }
        (Err(e), false) if c.expect == Expect::Either => {
            if let Err(m) = lib_clean_err(e) {
                return fail(m);
            }
        }
        (Err(e), false) => return fail(format!("qemu-img accepts the file, we refuse it: {e}")),
        (Ok(m), true) => {
            return fail(format!(
                "we accepted a file that must be refused; our map:\n{m}"
            ))
        }
        (Err(e), true) => {
            if let Err(m) = lib_clean_err(e) {
                return fail(m);
            }
        }
    }
    let lib_refused = lib.is_err();

    // The CLI, which must agree with the library.
    for args in [vec!["map", "--output", "json", &file], vec!["map", &file]] {
        let o = s.imgpull(&args);
        if lib_refused {
            if let Err(m) = clean_cli_error(&o, &culprits, c.keywords) {
                return fail(m);
            }
        } else if args.len() == 4 && (!o.ok() || o.stdout != q.stdout) {
            return fail(format!(
                "imgpull map --output json differs from qemu-img:\n{}",
                o.describe()
            ));
        } else if o.code() == Some(101) || o.code().is_none() {
            return fail(format!("imgpull map crashed:\n{}", o.describe()));
        }
    }

    // info: must not crash; where qemu-img info refuses, we refuse
    // cleanly; where both accept a file qemu maps, the fields agree.
    let info_variants: &[bool] = if c.in_chain { &[true] } else { &[false, true] };
    for &chain in info_variants {
        let mut qa = vec!["info", "--output=json"];
        let mut oa = vec!["info", "--output", "json"];
        if chain {
            qa.push("--backing-chain");
            oa.push("--backing-chain");
        }
        qa.push(&file);
        oa.push(&file);
        let qi = s.run_in(s.dir(), "qemu-img", &qa, Duration::from_secs(15));
        let oi = s.imgpull(&oa);
        if oi.code() == Some(101) || oi.code().is_none() {
            return fail(format!("imgpull info crashed:\n{}", oi.describe()));
        }
        if !qi.ok() {
            if let Err(m) = clean_cli_error(&oi, &culprits, c.keywords) {
                return fail(format!(
                    "qemu-img info refuses ({}), so must we: {m}",
                    qi.stderr.trim()
                ));
            }
        } else if oi.ok() && !lib_refused {
            let (Ok(qv), Ok(ov)) = (
                serde_json::from_str::<serde_json::Value>(&qi.stdout),
                serde_json::from_str::<serde_json::Value>(&oi.stdout),
            ) else {
                return fail(format!("unparsable info JSON:\n{}", oi.describe()));
            };
            let d = if chain {
                let (qa, oa) = (
                    qv.as_array().cloned().unwrap_or_default(),
                    ov.as_array().cloned().unwrap_or_default(),
                );
                if qa.len() != oa.len() {
                    format!(
                        "--backing-chain lengths differ: {} vs {}",
                        qa.len(),
                        oa.len()
                    )
                } else {
                    qa.iter()
                        .zip(&oa)
                        .map(|(a, b)| info_diff("layer", a, b))
                        .collect()
                }
            } else {
                info_diff("image", &qv, &ov)
            };
            if !d.is_empty() {
                return fail(format!("info differs from qemu-img:\n{d}"));
            }
        } else if !oi.ok() {
            if let Err(m) = clean_cli_error(&oi, &culprits, c.keywords) {
                return fail(format!("imgpull info failed unclearly: {m}"));
            }
        }
    }
    Ok(())
}

fn describe_short(o: &Output) -> String {
    if o.stdout.is_empty() && o.status.is_none() && o.cmdline.starts_with('(') {
        return o.cmdline.clone();
    }
    match o.status {
        None => "HUNG (killed at the time limit)".into(),
        Some(st) if st.success() => "accepted".into(),
        Some(st) => format!("{st}: {}", o.stderr.trim()),
    }
}

fn run_all(cases: Vec<Case>) {
    let mut f = Failures::new();
    for c in cases {
        let name = c.name.clone();
        f.check(&name, catch(move || run_case(&c)));
    }
    f.finish();
}

/// A small qcow2 (4k clusters, v3 unless `opts` says otherwise) with data.
fn qcow2(s: &Scratch, name: &str, opts: &str) -> String {
    let o = if opts.is_empty() {
        "cluster_size=4k".to_string()
    } else {
        format!("cluster_size=4k,{opts}")
    };
    s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, name, "1M"]);
    s.qemu_io(
        "qcow2",
        name,
        &["write -P 1 0 8k".into(), "write -P 2 512k 4k".into()],
    );
    name.to_string()
}

/// A LUKS-encrypted qcow2, made once per test process (LUKS key setup
/// costs QEMU about two seconds) and copied.
fn luks(s: &Scratch, name: &str) {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let bytes = IMAGE.get_or_init(|| {
        let t = Scratch::new();
        t.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k",
            "enc.qcow2",
            "1M",
        ]);
        std::fs::read(t.path("enc.qcow2")).expect("reading the LUKS image")
    });
    s.note(format!(
        "qemu-img create -q -f qcow2 --object secret,id=s0,data=x -o \
         encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k {name} 1M"
    ));
    std::fs::write(s.path(name), bytes).expect("writing the LUKS image");
}

/// A small QED (4k clusters, table_size 4) with data.
fn qed(s: &Scratch, name: &str) -> String {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k,table_size=4",
        name,
        "1M",
    ]);
    s.qemu_io(
        "qed",
        name,
        &["write -P 1 0 8k".into(), "write -P 2 512k 4k".into()],
    );
    name.to_string()
}

const TRUNC: &[&str] = &[
    "trunc",
    "short",
    "small",
    "end of file",
    "eof",
    "beyond",
    "past",
    "outside",
    "header",
    "cluster",
    "exceed",
    "size",
];
const L1: &[&str] = &[
    "l1",
    "table",
    "eof",
    "end of file",
    "beyond",
    "past",
    "outside",
    "offset",
];
const FEATURE: &[&str] = &["feature"];
const CLUSTER: &[&str] = &["cluster"];
const REFCOUNT: &[&str] = &["refcount", "reference count"];
const SIZE: &[&str] = &["size", "big", "large", "l1"];
const HEADER: &[&str] = &["header"];
const ENCRYPT: &[&str] = &["encrypt"];
const BACKING: &[&str] = &["backing"];
const SNAPSHOT: &[&str] = &["snapshot"];
const VERSION: &[&str] = &["version"];
const TABLE: &[&str] = &["table"];
/// qemu-img map hangs on backing loops (qemu-img info --backing-chain
/// says "creates an infinite loop"); we must refuse them.
const LOOP: &[&str] = &["loop"];
const MISSING: &[&str] = &["no such file", "not found", "does not exist", "missing"];

#[test]
fn truncated_files() {
    let mut v = Vec::new();
    for n in [
        0u64, 3, 4, 7, 8, 20, 48, 71, 72, 99, 103, 104, 111, 112, 4096, 8192, 12288, 16384,
    ] {
        v.push(case(
            format!("qcow2 v3 cut at {n}"),
            Expect::Either,
            TRUNC,
            move |s| {
                let f = qcow2(s, "cut.qcow2", "");
                s.truncate(&f, n);
                f
            },
        ));
    }
    for n in [72u64, 100, 4096] {
        v.push(case(
            format!("qcow2 v2 cut at {n}"),
            Expect::Either,
            TRUNC,
            move |s| {
                let f = qcow2(s, "cut2.qcow2", "compat=0.10");
                s.truncate(&f, n);
                f
            },
        ));
    }
    for n in [4u64, 8, 40, 63, 64, 100, 4096, 8192, 20000] {
        v.push(case(
            format!("qed cut at {n}"),
            Expect::Either,
            TRUNC,
            move |s| {
                let f = qed(s, "cut.qed");
                s.truncate(&f, n);
                f
            },
        ));
    }
    // Data clusters cut off: the L2 table survives, data is past EOF.
    v.push(case("qcow2 data past EOF", Expect::Either, TRUNC, |s| {
        let f = qcow2(s, "data.qcow2", "");
        let len = std::fs::metadata(s.path(&f)).map(|m| m.len()).unwrap_or(0);
        s.truncate(&f, len - 4096);
        f
    }));
    run_all(v);
}

#[test]
fn wrong_magic_probes_as_raw() {
    let v = vec![
        case("qcow2 name, bad magic", Expect::LikeQemu, &["raw"], |s| {
            let f = qcow2(s, "image.qcow2", "");
            s.be32(&f, 0, 0x1234_5678);
            f
        }),
        case("qed name, bad magic", Expect::LikeQemu, &["raw"], |s| {
            let f = qed(s, "image.qed");
            s.le32(&f, 0, 0x1234_5678);
            f
        }),
        case("text file named .qcow2", Expect::LikeQemu, &["raw"], |s| {
            std::fs::write(s.path("notes.qcow2"), b"hello, not an image\n").expect("write");
            s.note("printf 'hello, not an image\\n' > notes.qcow2");
            "notes.qcow2".into()
        }),
    ];
    run_all(v);
}

#[test]
fn qcow2_header_fields() {
    type Patch = fn(&Scratch, &str);
    let cases: Vec<(&str, Expect, &'static [&'static str], &str, Patch)> = vec![
        ("version 1", Expect::LikeQemu, VERSION, "", |s, f| {
            s.be32(f, 4, 1)
        }),
        ("version 4", Expect::LikeQemu, VERSION, "", |s, f| {
            s.be32(f, 4, 4)
        }),
        (
            "unknown incompatible feature bit 20",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 72, 1 << 20),
        ),
        (
            "unknown incompatible feature bit 5",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 72, 1 << 5),
        ),
        (
            "unknown incompatible feature bit 63",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 72, 1 << 63),
        ),
        (
            "unknown compatible feature bit",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 80, 1 << 40),
        ),
        (
            "unknown autoclear feature bit",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 88, 1 << 40),
        ),
        (
            "dirty bit without lazy refcounts",
            Expect::LikeQemu,
            FEATURE,
            "",
            |s, f| s.be64(f, 72, 1),
        ),
        ("corrupt bit", Expect::LikeQemu, &["corrupt"], "", |s, f| {
            s.be64(f, 72, 2)
        }),
        ("L1 table past EOF", Expect::Either, L1, "", |s, f| {
            s.be64(f, 40, 1 << 40)
        }),
        ("L1 table at 2^62", Expect::Either, L1, "", |s, f| {
            s.be64(f, 40, 1 << 62)
        }),
        ("L1 table unaligned", Expect::LikeQemu, L1, "", |s, f| {
            s.be64(f, 40, 4097)
        }),
        ("l1_size 0xffffffff", Expect::LikeQemu, L1, "", |s, f| {
            s.be32(f, 36, u32::MAX)
        }),
        ("l1_size 0", Expect::LikeQemu, L1, "", |s, f| {
            s.be32(f, 36, 0)
        }),
        (
            "l1_size 100000 (past EOF)",
            Expect::Either,
            L1,
            "",
            |s, f| s.be32(f, 36, 100_000),
        ),
        ("size 2^62", Expect::LikeQemu, SIZE, "", |s, f| {
            s.be64(f, 24, 1 << 62)
        }),
        ("size 2^50", Expect::LikeQemu, SIZE, "", |s, f| {
            s.be64(f, 24, 1 << 50)
        }),
        ("size u64::MAX", Expect::LikeQemu, SIZE, "", |s, f| {
            s.be64(f, 24, u64::MAX)
        }),
        ("size 1000", Expect::LikeQemu, SIZE, "", |s, f| {
            s.be64(f, 24, 1000)
        }),
        ("cluster_bits 8", Expect::LikeQemu, CLUSTER, "", |s, f| {
            s.be32(f, 20, 8)
        }),
        ("cluster_bits 22", Expect::LikeQemu, CLUSTER, "", |s, f| {
            s.be32(f, 20, 22)
        }),
        ("cluster_bits 64", Expect::LikeQemu, CLUSTER, "", |s, f| {
            s.be32(f, 20, 64)
        }),
        (
            "cluster_bits 0xffffffff",
            Expect::LikeQemu,
            CLUSTER,
            "",
            |s, f| s.be32(f, 20, u32::MAX),
        ),
        (
            "cluster_bits 16 (tables misaligned)",
            Expect::LikeQemu,
            &["refcount", "offset", "align", "l1", "table"],
            "",
            |s, f| s.be32(f, 20, 16),
        ),
        (
            "refcount table past EOF",
            Expect::Either,
            REFCOUNT,
            "",
            |s, f| s.be64(f, 48, 1 << 40),
        ),
        (
            "refcount table unaligned",
            Expect::LikeQemu,
            REFCOUNT,
            "",
            |s, f| s.be64(f, 48, 4097),
        ),
        (
            "refcount_table_clusters 0x7fffffff",
            Expect::LikeQemu,
            REFCOUNT,
            "",
            |s, f| s.be32(f, 56, 0x7fff_ffff),
        ),
        (
            "refcount_table_clusters 0",
            Expect::LikeQemu,
            REFCOUNT,
            "",
            |s, f| s.be32(f, 56, 0),
        ),
        (
            "refcount_order 7",
            Expect::LikeQemu,
            REFCOUNT,
            "",
            |s, f| s.be32(f, 96, 7),
        ),
        (
            "refcount_order 0xffffffff",
            Expect::LikeQemu,
            REFCOUNT,
            "",
            |s, f| s.be32(f, 96, u32::MAX),
        ),
        ("header_length 50", Expect::LikeQemu, HEADER, "", |s, f| {
            s.be32(f, 100, 50)
        }),
        (
            "header_length beyond cluster",
            Expect::LikeQemu,
            HEADER,
            "",
            |s, f| s.be32(f, 100, 100_000),
        ),
        (
            "crypt_method 1 (AES)",
            Expect::Refuse,
            ENCRYPT,
            "",
            |s, f| s.be32(f, 32, 1),
        ),
        (
            "crypt_method 2 without LUKS header",
            Expect::Refuse,
            ENCRYPT,
            "",
            |s, f| s.be32(f, 32, 2),
        ),
        ("crypt_method 3", Expect::Refuse, ENCRYPT, "", |s, f| {
            s.be32(f, 32, 3)
        }),
        (
            "backing name offset past EOF",
            Expect::LikeQemu,
            BACKING,
            "",
            |s, f| {
                s.be64(f, 8, 1 << 40);
                s.be32(f, 16, 10);
            },
        ),
        (
            "backing name length 2000",
            Expect::LikeQemu,
            BACKING,
            "",
            |s, f| {
                s.be64(f, 8, 512);
                s.be32(f, 16, 2000);
            },
        ),
        (
            "backing name length 0xffffffff",
            Expect::LikeQemu,
            BACKING,
            "",
            |s, f| {
                s.be64(f, 8, 512);
                s.be32(f, 16, u32::MAX);
            },
        ),
        (
            "snapshot table past EOF",
            Expect::Either,
            SNAPSHOT,
            "",
            |s, f| {
                s.be32(f, 60, 5);
                s.be64(f, 64, 1 << 40);
            },
        ),
        (
            "nb_snapshots 0x7fffffff",
            Expect::LikeQemu,
            SNAPSHOT,
            "",
            |s, f| s.be32(f, 60, 0x7fff_ffff),
        ),
        (
            "compression_type 7",
            Expect::LikeQemu,
            &["compression"],
            "",
            |s, f| {
                // The compression-type incompatible bit (3) with an unknown type.
                s.be64(f, 72, 1 << 3);
                s.patch(f, 104, &[7]);
            },
        ),
        (
            // In a v2 header these bytes are the first header extension
            // (end marker type, absurd length): QEMU says "Header
            // extension too large".
            "v2: bytes at 72 are no feature bits",
            Expect::LikeQemu,
            HEADER,
            "compat=0.10",
            |s, f| s.be64(f, 72, 1 << 20),
        ),
        (
            "v2: cluster_bits 30",
            Expect::LikeQemu,
            CLUSTER,
            "compat=0.10",
            |s, f| s.be32(f, 20, 30),
        ),
    ];
    let v = cases
        .into_iter()
        .map(|(name, expect, kw, opts, patch)| {
            case(format!("qcow2 {name}"), expect, kw, move |s| {
                let f = qcow2(s, "bad.qcow2", opts);
                patch(s, &f);
                f
            })
        })
        .collect();
    run_all(v);
}

#[test]
fn qed_header_fields() {
    type Patch = fn(&Scratch, &str);
    let cases: Vec<(&str, Expect, &'static [&'static str], Patch)> = vec![
        ("cluster_size 3000", Expect::LikeQemu, CLUSTER, |s, f| {
            s.le32(f, 4, 3000)
        }),
        ("cluster_size 2048", Expect::LikeQemu, CLUSTER, |s, f| {
            s.le32(f, 4, 2048)
        }),
        ("cluster_size 128M", Expect::LikeQemu, CLUSTER, |s, f| {
            s.le32(f, 4, 1 << 27)
        }),
        ("cluster_size 0", Expect::LikeQemu, CLUSTER, |s, f| {
            s.le32(f, 4, 0)
        }),
        ("cluster_size 2^31", Expect::LikeQemu, CLUSTER, |s, f| {
            s.le32(f, 4, 1 << 31)
        }),
        ("table_size 0", Expect::LikeQemu, TABLE, |s, f| {
            s.le32(f, 8, 0)
        }),
        ("table_size 3", Expect::LikeQemu, TABLE, |s, f| {
            s.le32(f, 8, 3)
        }),
        ("table_size 32", Expect::LikeQemu, TABLE, |s, f| {
            s.le32(f, 8, 32)
        }),
        ("table_size 0xffffffff", Expect::LikeQemu, TABLE, |s, f| {
            s.le32(f, 8, u32::MAX)
        }),
        ("header_size 0", Expect::LikeQemu, HEADER, |s, f| {
            s.le32(f, 12, 0)
        }),
        (
            "header_size huge",
            Expect::LikeQemu,
            &["header", "table", "offset"],
            |s, f| s.le32(f, 12, 100_000),
        ),
        ("unknown feature bit", Expect::LikeQemu, FEATURE, |s, f| {
            s.le64(f, 16, 1 << 10)
        }),
        (
            "unknown compat feature bit",
            Expect::LikeQemu,
            FEATURE,
            |s, f| s.le64(f, 24, 1 << 10),
        ),
        ("L1 table past EOF", Expect::LikeQemu, L1, |s, f| {
            s.le64(f, 40, 1 << 40)
        }),
        ("L1 table unaligned", Expect::LikeQemu, L1, |s, f| {
            s.le64(f, 40, 4097)
        }),
        ("L1 table at 0", Expect::LikeQemu, L1, |s, f| {
            s.le64(f, 40, 0)
        }),
        ("image_size 2^62", Expect::LikeQemu, SIZE, |s, f| {
            s.le64(f, 48, 1 << 62)
        }),
        ("image_size 1000", Expect::LikeQemu, SIZE, |s, f| {
            s.le64(f, 48, 1000)
        }),
        ("image_size 0", Expect::LikeQemu, SIZE, |s, f| {
            s.le64(f, 48, 0)
        }),
        (
            "backing name offset past EOF",
            Expect::LikeQemu,
            BACKING,
            |s, f| {
                s.le64(f, 16, 1);
                s.le32(f, 56, 1 << 30);
                s.le32(f, 60, 10);
            },
        ),
        (
            "backing name size huge",
            Expect::LikeQemu,
            BACKING,
            |s, f| {
                s.le64(f, 16, 1);
                s.le32(f, 56, 64);
                s.le32(f, 60, 100_000);
            },
        ),
        ("backing name size 0", Expect::LikeQemu, BACKING, |s, f| {
            s.le64(f, 16, 1);
            s.le32(f, 56, 64);
            s.le32(f, 60, 0);
        }),
    ];
    let v = cases
        .into_iter()
        .map(|(name, expect, kw, patch)| {
            case(format!("qed {name}"), expect, kw, move |s| {
                let f = qed(s, "bad.qed");
                patch(s, &f);
                f
            })
        })
        .collect();
    run_all(v);
}

#[test]
fn broken_backing_chains() {
    let mut v = Vec::new();
    let mut c = case("missing backing file", Expect::LikeQemu, MISSING, |s| {
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ]);
        "top.qcow2".into()
    });
    c.in_chain = true;
    c.culprits = vec!["top.qcow2", "missing.qcow2"];
    v.push(c);
    let mut c = case(
        "missing backing two levels down",
        Expect::LikeQemu,
        MISSING,
        |s| {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "gone.qed",
                "-F",
                "qed",
                "mid.qcow2",
                "1M",
            ]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qed",
                "-u",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qed",
                "1M",
            ]);
            "top.qed".into()
        },
    );
    c.in_chain = true;
    c.culprits = vec!["mid.qcow2", "gone.qed"];
    v.push(c);
    let mut c = case("backing loop a -> b -> a", Expect::Refuse, LOOP, |s| {
        s.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ]);
        s.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ]);
        "a.qcow2".into()
    });
    c.in_chain = true;
    c.culprits = vec!["a.qcow2", "b.qcow2"];
    v.push(c);
    let mut c = case(
        "backing loop through a QED: a -> b.qed -> a",
        Expect::Refuse,
        LOOP,
        |s| {
            s.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-u", "-b", "b.qed", "-F", "qed", "a.qcow2", "1M",
            ]);
            s.qemu_img(&[
                "create", "-q", "-f", "qed", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qed", "1M",
            ]);
            "a.qcow2".into()
        },
    );
    c.in_chain = true;
    c.culprits = vec!["a.qcow2", "b.qed"];
    v.push(c);
    let mut c = case("backing loop a -> a", Expect::Refuse, LOOP, |s| {
        // qemu-img refuses to create it; write the name in by hand
        // (same length as the placeholder).
        s.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", "x.qcow2", "-F", "qcow2", "s.qcow2", "1M",
        ]);
        let off = common::get_be64(&s.path("s.qcow2"), 8);
        s.patch("s.qcow2", off, b"s");
        "s.qcow2".into()
    });
    c.in_chain = true;
    v.push(c);
    let mut c = case(
        "backing loop via a different path: d/a -> ../d/a",
        Expect::Refuse,
        LOOP,
        |s| {
            std::fs::create_dir(s.path("d")).expect("mkdir");
            s.note("mkdir d");
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "../d/x.qcow2",
                "-F",
                "qcow2",
                "d/a.qcow2",
                "1M",
            ]);
            let off = common::get_be64(&s.path("d/a.qcow2"), 8);
            s.patch("d/a.qcow2", off + 5, b"a");
            "d/a.qcow2".into()
        },
    );
    c.in_chain = true;
    c.culprits = vec!["a.qcow2"];
    v.push(c);
    let mut c = case("json: backing name", Expect::Refuse, &["json"], |s| {
        qcow2(s, "base.qcow2", "");
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ]);
        "top.qcow2".into()
    });
    c.in_chain = true;
    c.culprits = vec!["top.qcow2"];
    v.push(c);
    for name in [
        "nbd://127.0.0.1:1/export",
        "nbd:127.0.0.1:1",
        "http://127.0.0.1:1/x.img",
    ] {
        let mut c = case(
            format!("protocol backing name {name}"),
            Expect::Refuse,
            &["nbd", "http", "protocol"],
            move |s| {
                s.qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-u",
                    "-b",
                    name,
                    "-F",
                    "raw",
                    "top.qcow2",
                    "1M",
                ]);
                "top.qcow2".into()
            },
        );
        c.in_chain = true;
        c.culprits = vec!["top.qcow2"];
        v.push(c);
    }
    let mut c = case(
        "backing format we do not support (vmdk)",
        Expect::Refuse,
        &["vmdk", "format"],
        |s| {
            s.qemu_img(&["create", "-q", "-f", "vmdk", "base.vmdk", "1M"]);
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                "top.qcow2",
            ]);
            "top.qcow2".into()
        },
    );
    c.in_chain = true;
    c.culprits = vec!["top.qcow2", "base.vmdk"];
    v.push(c);
    let mut c = case(
        "backing is a directory",
        Expect::LikeQemu,
        &["directory", "dir"],
        |s| {
            std::fs::create_dir(s.path("adir")).expect("mkdir");
            s.note("mkdir adir");
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "adir",
                "-F",
                "raw",
                "top.qcow2",
                "1M",
            ]);
            "top.qcow2".into()
        },
    );
    c.in_chain = true;
    c.culprits = vec!["top.qcow2", "adir"];
    v.push(c);
    run_all(v);
}

#[test]
fn unsupported_qcow2_features() {
    let mut v = Vec::new();
    v.push(case("LUKS-encrypted qcow2", Expect::Refuse, ENCRYPT, |s| {
        luks(s, "enc.qcow2");
        "enc.qcow2".into()
    }));
    // External data file: either supported exactly like QEMU, or refused
    // with a message naming it.
    v.push(case(
        "external data file",
        Expect::Either,
        &["data file", "data_file", "external"],
        |s| {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=img.data,cluster_size=4k",
                "ext.qcow2",
                "1M",
            ]);
            s.qemu_io("qcow2", "ext.qcow2", &["write -P 3 64k 64k".into()]);
            "ext.qcow2".into()
        },
    ));
    v.push(case(
        "external data file, data_file_raw",
        Expect::Either,
        &["data file", "data_file", "external"],
        |s| {
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=img.data,data_file_raw=on,cluster_size=4k",
                "ext.qcow2",
                "1M",
            ]);
            s.qemu_io("qcow2", "ext.qcow2", &["write -P 3 64k 64k".into()]);
            "ext.qcow2".into()
        },
    ));
    // Internal snapshots: reading is fine (QEMU maps the active layer).
    v.push(case(
        "internal snapshot (read)",
        Expect::LikeQemu,
        SNAPSHOT,
        |s| {
            let f = qcow2(s, "snap.qcow2", "");
            s.qemu_img(&["snapshot", "-c", "s1", &f]);
            s.qemu_io(
                "qcow2",
                &f,
                &["write -P 9 0 4k".into(), "write -P 8 256k 8k".into()],
            );
            f
        },
    ));
    run_all(v);
}

/// Writing where we must not: internal snapshots, the corrupt bit,
/// encrypted images. Opening for write or the write itself is refused with
/// a message naming the image and the reason, and the file is unchanged.
#[test]
fn writes_refused() {
    type Build = fn(&Scratch) -> String;
    let cases: Vec<(&str, &'static [&'static str], Build)> = vec![
        ("internal snapshot", SNAPSHOT, |s| {
            let f = qcow2(s, "snap.qcow2", "");
            s.qemu_img(&["snapshot", "-c", "s1", &f]);
            f
        }),
        ("corrupt bit", &["corrupt"], |s| {
            let f = qcow2(s, "corrupt.qcow2", "");
            s.be64(&f, 72, 2);
            f
        }),
        ("encrypted", ENCRYPT, |s| {
            luks(s, "enc.qcow2");
            "enc.qcow2".into()
        }),
        ("unknown incompatible feature", FEATURE, |s| {
            let f = qcow2(s, "feat.qcow2", "");
            s.be64(&f, 72, 1 << 20);
            f
        }),
    ];
    let mut f = Failures::new();
    for (name, kw, build) in cases {
        f.check(
            name,
            catch(move || {
                let s = Scratch::new();
                let file = build(&s);
                let before = std::fs::read(s.path(&file)).map_err(|e| e.to_string())?;
                let p = s.path(&file);
                s.note(format!(
                    "# imgpull: Chain::open({file}, writable) and write 0+4096"
                ));
                let r: Result<(), String> = with_timeout(
                    "writable open + write",
                    Duration::from_secs(30),
                    move || {
                        let chain = Chain::open(
                            &p,
                            &ChainOptions {
                                writable: true,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| e.to_string())?;
                        let top = chain.top();
                        top.write(0, &[0xAB; 4096], &chain.below(1))
                            .map_err(|e| e.to_string())?;
                        top.flush().map_err(|e| e.to_string())
                    },
                );
                let e = match r {
                    Ok(()) => return Err(format!("the write was accepted\n{}", s.reproducer())),
                    Err(e) => e,
                };
                if !e.contains(&file) || !contains_any(&e, kw) {
                    return Err(format!(
                        "refusal must name {file} and one of {kw:?}: {e}\n{}",
                        s.reproducer()
                    ));
                }
                let after = std::fs::read(s.path(&file)).map_err(|e| e.to_string())?;
                if before != after {
                    return Err(format!(
                        "the refused write changed the file\n{}",
                        s.reproducer()
                    ));
                }
                Ok(())
            }),
        );
    }
    f.finish();
}
