//! qemu-based tests: images written by qemu-io read back and map like
//! qemu-img says; images written by us pass `qemu-img check` and compare
//! equal to a model.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::driver::{BackingFile, Format, Status};
use crate::error::Result;
use crate::image::{CreateOptions, GuestRead, Image, OpenOptions, Zeros};

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

fn qemu_img(args: &[&str]) -> String {
    let (ok, s) = run("qemu-img", args);
    assert!(ok, "qemu-img {args:?} failed: {s}");
    s
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (ok, s) = run("qemu-io", &a);
    assert!(
        ok && !s.contains("error") && !s.contains("failed"),
        "qemu-io {cmds:?}: {s}"
    );
}

fn check_clean(img: &Path) {
    let (ok, s) = run("qemu-img", &["check", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(
        ok && s.contains("No errors were found"),
        "qemu-img check {img:?}: {s}"
    );
    assert!(!s.contains("leaked"), "qemu-img check {img:?}: {s}");
}

fn open(p: &Path, writable: bool) -> Image {
    Image::open(
        p,
        &OpenOptions {
            writable,
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .unwrap()
}

/// One entry of `qemu-img map --output=json`, as a status of ours.
fn qemu_map(img: &Path) -> Vec<(u64, u64, Status)> {
    let s = qemu_img(&["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]);
    let mut out = Vec::new();
    for obj in s.split('{').skip(1) {
        let body = obj.split('}').next().unwrap();
        let mut f = std::collections::HashMap::new();
        for kv in body.split(',') {
            if let Some((k, v)) = kv.split_once(':') {
                f.insert(k.trim().trim_matches('"').to_string(), v.trim().to_string());
            }
        }
        let num = |k: &str| f.get(k).map(|v| v.parse::<u64>().unwrap());
        let flag = |k: &str| f.get(k).map(|v| v == "true").unwrap_or(false);
        assert_eq!(num("depth"), Some(0));
        let st = if !flag("present") {
            Status::Unallocated {
                host: num("offset"),
            }
        } else if flag("compressed") {
            Status::Compressed
        } else if flag("data") {
            Status::Data {
                host: num("offset").unwrap(),
            }
        } else {
            Status::Zero {
                host: num("offset"),
            }
        };
        out.push((num("start").unwrap(), num("length").unwrap(), st));
    }
    merge(out)
}

fn merge(v: Vec<(u64, u64, Status)>) -> Vec<(u64, u64, Status)> {
    let mut out: Vec<(u64, u64, Status)> = Vec::new();
    for (s, l, st) in v {
        if let Some(last) = out.last_mut() {
            let joins = match (last.2, st) {
                (Status::Data { host: a }, Status::Data { host: b }) => b == a + last.1,
                (Status::Zero { host: Some(a) }, Status::Zero { host: Some(b) }) => b == a + last.1,
                (a, b) => {
                    a == b && !matches!(a, Status::Data { .. } | Status::Zero { host: Some(_) })
                }
            };
            if joins && last.0 + last.1 == s {
                last.1 += l;
                continue;
            }
        }
        out.push((s, l, st));
    }
    out
}

fn our_map(img: &Image) -> Vec<(u64, u64, Status)> {
    let size = img.virtual_size();
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < size {
        let e = img.block_status(pos, size - pos).unwrap();
        out.push((e.offset, e.len, e.status));
        pos = e.end();
    }
    let n = out.len();
    let merged = merge(out);
    assert_eq!(
        merged.len(),
        n,
        "block_status returned extents that should merge"
    );
    merged
}

fn read_all(img: &Image, below: &dyn GuestRead) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read(0, &mut buf, below).unwrap();
    buf
}

fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("converted.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

fn qcreate(p: &Path, opts: &str, size: u64) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.push("-o");
        a.push(opts);
    }
    let s = size.to_string();
    a.push(p.to_str().unwrap());
    a.push(&s);
    qemu_img(&a);
}

fn kv(opts: &str) -> Vec<(String, String)> {
    opts.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (k, v) = s.split_once('=').unwrap();
            (k.into(), v.into())
        })
        .collect()
}

fn cluster_of(opts: &str) -> u64 {
    kv(opts)
        .iter()
        .find(|(k, _)| k == "cluster_size")
        .map(|(_, v)| super::create::parse_size(v).unwrap())
        .unwrap_or(65536)
}

/// qemu-io cannot write compressed clusters with 1- or 2-bit refcounts
/// (they share host clusters).
fn no_compress(opts: &str) -> bool {
    kv(opts)
        .iter()
        .any(|(k, v)| k == "refcount_bits" && (v == "1" || v == "2"))
}

const MATRIX: &[&str] = &[
    "compat=0.10",
    "compat=0.10,cluster_size=4k",
    "cluster_size=512",
    "cluster_size=4k,refcount_bits=1",
    "cluster_size=1k,refcount_bits=2",
    "cluster_size=4k,refcount_bits=4",
    "refcount_bits=8",
    "cluster_size=8k,refcount_bits=32",
    "cluster_size=16k,refcount_bits=64",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=32k,compression_type=zstd",
    "compression_type=zstd,cluster_size=4k",
    "lazy_refcounts=on,cluster_size=128k",
];

#[test]
fn qemu_written_images_read_and_map_like_qemu() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    for opts in MATRIX {
        let cs = cluster_of(opts);
        let size = (24 * cs).max(1 << 20) + 512;
        let p = dir.path().join("q.qcow2");
        qcreate(&p, opts, size);
        let tail = size / cs * cs - 2 * cs;
        let cmds = vec![
            format!("write -P 0xab 0 {}", 2 * cs),
            format!("write -z {} {}", 4 * cs, 2 * cs),
            format!("write -c -P 0x5c {} {}", 6 * cs, 2 * cs),
            format!("write -P 0x11 {} {}", 8 * cs + cs / 2, cs / 4),
            format!("write -z {} {}", 8 * cs, cs / 4),
            format!("write -z -u {} {}", 9 * cs, cs),
            format!("discard {} {}", cs, cs),
            format!("write -P 0x33 {} {}", 10 * cs + 7, (cs / 2).min(1000)),
            format!("write -c -P 0x66 {} {}", 11 * cs, 2 * cs),
            format!("write -P 0x44 {} 512", 12 * cs + 512),
            format!("write -P 0x55 {} {}", tail, size - tail),
            format!("write -c -P 0x77 {} {}", 14 * cs, cs),
        ];
        // Compressed clusters share host clusters: not with 1-bit refcounts.
        let cmds: Vec<String> = if no_compress(opts) {
            cmds.iter()
                .map(|c| c.replace("write -c", "write"))
                .collect()
        } else {
            cmds
        };
        qemu_io(&p, &cmds);
        let img = open(&p, false);
        assert_eq!(our_map(&img), qemu_map(&p), "map differs for {opts}");
        let ours = read_all(&img, &Zeros);
        assert!(
            ours == qemu_raw(&p, dir.path()),
            "content differs for {opts}"
        );
        // read_compressed serves partial ranges spanning clusters.
        let mut part = vec![0u8; cs as usize];
        if !matches!(
            img.block_status(6 * cs, 1).unwrap().status,
            Status::Compressed
        ) {
            continue;
        }
        img.driver()
            .read_compressed(6 * cs + cs / 2, &mut part)
            .unwrap();
        assert_eq!(
            &part[..],
            &ours[(6 * cs + cs / 2) as usize..(7 * cs + cs / 2) as usize]
        );
        assert!(img.driver().read_compressed(0, &mut part).is_err());
    }
}

/// A raw backing file read as the layer below.
struct RawBelow(File);

impl GuestRead for RawBelow {
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::storage::pread_full(&self.0, buf, offset).unwrap();
        Ok(())
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random writes and zeroes through Image over a model; returns the model.
fn random_ops(
    img: &Image,
    model: &mut [u8],
    below: &dyn GuestRead,
    seed: u64,
    n: usize,
    max_len: u64,
) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    let g = img.driver().granularity();
    for i in 0..n {
        let mut off = rng.below(size);
        let mut len = 1 + rng.below(max_len.min(size - off));
        if rng.below(3) == 0 {
            // Granule-aligned piece.
            off = off / g * g;
            len = (len.div_ceil(g) * g).min(size - off);
        }
        if rng.below(4) == 0 {
            img.write_zeroes(off, len, below).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let byte = (i as u8).wrapping_mul(31).wrapping_add(7) | 1;
            let data = vec![byte; len as usize];
            img.write(off, &data, below).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
}

fn compare_to_model(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let (ok, s) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    assert!(ok, "qemu-img compare: {s}");
}

fn create(p: &Path, size: u64, backing: Option<BackingFile>, opts: &str) {
    Image::create(
        p,
        &CreateOptions {
            format: Format::Qcow2,
            size,
            backing,
            options: kv(opts),
        },
    )
    .unwrap();
}

#[test]
fn our_writes_pass_check_and_match_a_model() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    for (k, opts) in MATRIX.iter().enumerate() {
        let cs = cluster_of(opts);
        let size = (32 * cs).max(1 << 20) + 1536;
        let p = dir.path().join("w.qcow2");
        let with_backing = k % 2 == 1;
        let base = dir.path().join("base.raw");
        let mut model = vec![0u8; size as usize];
        let below: Box<dyn GuestRead> = if with_backing {
            let mut b = vec![0u8; size as usize - 4096];
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i % 253) as u8 ^ 0x5a;
            }
            std::fs::write(&base, &b).unwrap();
            model[..b.len()].copy_from_slice(&b);
            create(
                &p,
                size,
                Some(BackingFile {
                    name: "base.raw".into(),
                    format: Some("raw".into()),
                }),
                opts,
            );
            Box::new(RawBelow(File::open(&base).unwrap()))
        } else {
            create(&p, size, None, opts);
            Box::new(Zeros)
        };
        check_clean(&p);
        // qemu adds compressed and zero clusters to our image.
        let c = if opts.contains("refcount_bits=1,") {
            ""
        } else {
            "-c"
        };
        qemu_io(
            &p,
            &[
                format!("write {c} -P 0x77 {} {}", 2 * cs, 3 * cs),
                format!("write -P 0x78 {} {}", 6 * cs, cs),
                format!("write -z {} {}", 7 * cs, cs),
            ],
        );
        model[(2 * cs) as usize..(5 * cs) as usize].fill(0x77);
        model[(6 * cs) as usize..(7 * cs) as usize].fill(0x78);
        model[(7 * cs) as usize..(8 * cs) as usize].fill(0);
        {
            let img = open(&p, true);
            random_ops(
                &img,
                &mut model,
                &*below,
                0x9e37_79b9 + k as u64,
                60,
                3 * cs,
            );
            // Partial overwrite of compressed data.
            let d = vec![0xc3u8; (cs / 2) as usize];
            img.write(2 * cs + cs / 4, &d, &*below).ok();
            model[(2 * cs + cs / 4) as usize..(2 * cs + 3 * cs / 4) as usize].fill(0xc3);
            img.flush().unwrap();
            let again = read_all(&img, &*below);
            assert!(again == model, "read-back differs for {opts}");
        }
        check_clean(&p);
        compare_to_model(&p, &model, dir.path());
        // Our map answers still agree with qemu's after our writes.
        let img = open(&p, false);
        if !with_backing {
            assert_eq!(our_map(&img), qemu_map(&p), "map differs for {opts}");
        }
    }
}

#[test]
fn refcount_table_grows() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    for opts in ["cluster_size=512,refcount_bits=64", "cluster_size=512"] {
        let p = dir.path().join("g.qcow2");
        let size = 12u64 << 20;
        create(&p, size, None, opts);
        let mut model = vec![0u8; size as usize];
        {
            let img = open(&p, true);
            // 10 MiB of data: the first refcount table (one 512-byte
            // cluster) describes 2 MiB (64-bit) or 8 MiB (16-bit).
            let chunk = vec![0xa5u8; 1 << 20];
            for i in 0..10u64 {
                let off = i * (1 << 20) + 512 * i;
                img.write(off, &chunk, &Zeros).unwrap();
                model[off as usize..off as usize + chunk.len()].copy_from_slice(&chunk);
            }
            img.flush().unwrap();
        }
        let info = qemu_img(&["check", "--output=json", p.to_str().unwrap()]);
        assert!(!info.contains("\"corruptions\""), "{info}");
        check_clean(&p);
        compare_to_model(&p, &model, dir.path());
        // The refcount table moved away from cluster 1.
        let f = File::open(&p).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 48).unwrap();
        assert_ne!(u64::from_be_bytes(b), 512, "{opts}: table did not move");
    }
}

#[test]
fn dirty_image_is_repaired_on_writable_open() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let p = dir.path().join("d.qcow2");
    qcreate(&p, "lazy_refcounts=on,cluster_size=4k", 8 << 20);
    let pat = |off: u64, len: u64, byte: u8| format!("write -P {byte} {off} {len}");
    let (_, s) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &pat(0, 1 << 20, 1),
            "-c",
            &pat(3 << 20, 100 << 10, 2),
            "-c",
            "sigraise 9",
            p.to_str().unwrap(),
        ],
    );
    let _ = s;
    let img = open(&p, false);
    assert!(img.info().dirty, "qemu-io did not leave the image dirty");
    let before = read_all(&img, &Zeros);
    drop(img);
    let (ok, _) = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(!ok, "dirty image should fail check before repair");
    let img = open(&p, true);
    assert!(!img.info().dirty);
    let mut model = before.clone();
    img.write(5 << 20, &[9u8; 10000], &Zeros).unwrap();
    model[5 << 20..(5 << 20) + 10000].fill(9);
    img.flush().unwrap();
    drop(img);
    check_clean(&p);
    compare_to_model(&p, &model, dir.path());
    let info = qemu_img(&["info", p.to_str().unwrap()]);
    assert!(!info.contains("dirty"), "{info}");
}

#[test]
fn huge_sparse_image_maps_fast() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let p = dir.path().join("h.qcow2");
    let size = 1u64 << 40;
    create(&p, size, None, "");
    {
        let img = open(&p, true);
        img.write(size / 2, b"hello", &Zeros).unwrap();
    }
    let img = open(&p, false);
    let t = std::time::Instant::now();
    let m = our_map(&img);
    eprintln!("mapping the 1 TiB image took {:?}", t.elapsed());
    assert_eq!(m.len(), 3);
    assert_eq!(m[0], (0, size / 2, Status::Unallocated { host: None }));
    assert!(matches!(m[1].2, Status::Data { .. }));
    assert_eq!(m, qemu_map(&p));
}

#[test]
fn info_and_layout_match_qemu_img_create() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let fs_of = |p: &Path| {
        let s = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        let i = s.find("\"format-specific\"").unwrap();
        let j = s[i..].find('}').unwrap();
        let k = s.find("\"cluster-size\"").unwrap();
        let v = s.find("\"virtual-size\": 1").unwrap();
        (
            s[i..i + j].to_string(),
            s[k..k + 30].to_string(),
            s[v..v + 30].to_string(),
        )
    };
    let mut extra: Vec<&str> = MATRIX.to_vec();
    extra.push("compat=v3,cluster_size=64k,refcount_bits=16");
    for opts in extra {
        let ours = dir.path().join("o.qcow2");
        let theirs = dir.path().join("t.qcow2");
        create(&ours, 100 << 20, None, opts);
        qcreate(&theirs, opts, 100 << 20);
        check_clean(&ours);
        assert_eq!(fs_of(&ours), fs_of(&theirs), "{opts}");
        // Same layout and header bytes for the default-sized tables.
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert_eq!(a.len(), b.len(), "{opts}: file length");
        assert!(a == b, "{opts}: bytes differ from qemu-img create");
        let img = open(&ours, false);
        let info = img.info();
        let q = qemu_img(&["info", "--output=json", ours.to_str().unwrap()]);
        for (key, val) in &info.format_specific {
            let want = match val {
                crate::driver::InfoValue::Bool(b) => format!("\"{key}\": {b}"),
                crate::driver::InfoValue::Int(n) => format!("\"{key}\": {n}"),
                crate::driver::InfoValue::Str(s) => format!("\"{key}\": \"{s}\""),
            };
            assert!(q.contains(&want), "{opts}: {want} not in {q}");
        }
    }
    // With a backing file, v2 and v3.
    for opts in ["compat=0.10", ""] {
        let ours = dir.path().join("ob.qcow2");
        let theirs = dir.path().join("tb.qcow2");
        let b = BackingFile {
            name: "base.qcow2".into(),
            format: Some("qcow2".into()),
        };
        create(&dir.path().join("base.qcow2"), 1 << 20, None, "");
        create(&ours, 1 << 20, Some(b.clone()), opts);
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ];
        let o = opts.to_string();
        if !opts.is_empty() {
            args.push("-o");
            args.push(&o);
        }
        let t = theirs.to_str().unwrap().to_string();
        args.push(&t);
        args.push("1M");
        let (ok, s) = Command::new("qemu-img")
            .args(&args)
            .current_dir(dir.path())
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
            .unwrap();
        assert!(ok, "{s}");
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{opts}"
        );
        assert_eq!(open(&ours, false).info().backing, Some(b));
    }
}

fn write_at(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(p: &Path, writable: bool) -> String {
    Image::open(
        p,
        &OpenOptions {
            writable,
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_else(|| "opened".into())
}

#[test]
fn bad_images_are_refused_cleanly() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let good = dir.path().join("good.qcow2");
    create(&good, 64 << 20, None, "");
    {
        let img = open(&good, true);
        img.write(0, &[1u8; 70000], &Zeros).unwrap();
    }
    let fresh = |name: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        p
    };
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        ("magic", 0, b"QFI\0".to_vec(), "magic"),
        ("version", 4, 9u32.to_be_bytes().to_vec(), "version"),
        ("cbits", 20, 40u32.to_be_bytes().to_vec(), "cluster_bits"),
        ("crypt", 32, 2u32.to_be_bytes().to_vec(), "encrypted"),
        ("l1size", 36, u32::MAX.to_be_bytes().to_vec(), "L1 table"),
        ("l1small", 36, 0u32.to_be_bytes().to_vec(), "too small"),
        ("l1off", 40, (1u64 << 50).to_be_bytes().to_vec(), "L1 table"),
        (
            "rtoff",
            48,
            (1u64 << 50).to_be_bytes().to_vec(),
            "refcount table",
        ),
        (
            "rtsize",
            56,
            u32::MAX.to_be_bytes().to_vec(),
            "refcount table",
        ),
        (
            "incompat",
            72,
            (1u64 << 40).to_be_bytes().to_vec(),
            "bit 40",
        ),
        (
            "datafile",
            72,
            4u64.to_be_bytes().to_vec(),
            "external data file",
        ),
        (
            "hlen",
            100,
            0x20000u32.to_be_bytes().to_vec(),
            "header length",
        ),
        ("backing", 8, 0xfff0u64.to_be_bytes().to_vec(), "backing"),
        ("size", 24, u64::MAX.to_be_bytes().to_vec(), "too small"),
    ];
    for (name, off, bytes, msg) in cases {
        let p = fresh(name);
        write_at(&p, off, &bytes);
        if name == "backing" {
            write_at(&p, 16, &100u32.to_be_bytes());
        }
        let e = open_err(&p, false);
        assert!(e.contains(msg), "{name}: {e}");
    }
    // Unknown incompatible bit named in the feature table.
    let p = fresh("named");
    write_at(&p, 72, &(1u64 << 1 | 1 << 3).to_be_bytes());
    // corrupt + compression bit without the field.
    assert!(open_err(&p, false).contains("compression type"));
    // Truncated file.
    let p = fresh("trunc");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    assert!(open_err(&p, false).contains("short"));
    // Corrupt bit: read-only fine, writable refused.
    let p = fresh("corrupt");
    write_at(&p, 72, &2u64.to_be_bytes());
    assert_eq!(open_err(&p, false), "opened");
    assert!(open_err(&p, true).contains("corrupt"));
    // L2 entry pointing outside the file: an error on access, no write.
    let p = fresh("l2out");
    let f = File::open(&p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 3 * 65536).unwrap();
    let l2 = u64::from_be_bytes(b) & super::l2::OFFSET_MASK;
    write_at(&p, l2, &((1u64 << 40) | 1 << 63).to_be_bytes());
    let img = open(&p, true);
    assert!(img.block_status(0, 4096).is_err());
    assert!(img.write(100, b"x", &Zeros).is_err());
    let mut buf = [0u8; 16];
    assert!(img.read(0, &mut buf, &Zeros).is_err());
    // Internal snapshots: reading fine, writing refused.
    let p = fresh("snap");
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    assert_eq!(open_err(&p, false), "opened");
    assert!(open_err(&p, true).contains("snapshots"));
}

#[test]
fn set_backing_keeps_other_extensions() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    for opts in ["compat=0.10", "cluster_size=512", ""] {
        let p = dir.path().join("s.qcow2");
        create(&p, 1 << 20, None, opts);
        // Add an unknown extension by hand.
        let mut buf = std::fs::read(&p).unwrap();
        buf.truncate(4096);
        let mut h = super::header::Header::parse(&buf, |_| Ok(buf.clone())).unwrap();
        h.extensions.push(super::header::Extension {
            kind: 0x1234_5678,
            data: vec![7; 5],
        });
        write_at(&p, 0, &h.encode().unwrap());
        let img = open(&p, true);
        let b = BackingFile {
            name: "base.raw".into(),
            format: Some("raw".into()),
        };
        std::fs::write(dir.path().join("base.raw"), vec![3u8; 1 << 20]).unwrap();
        img.set_backing(Some(&b)).unwrap();
        assert_eq!(img.info().backing, Some(b));
        drop(img);
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        assert!(
            info.contains("\"backing-filename\": \"base.raw\""),
            "{info}"
        );
        assert!(
            info.contains("\"backing-filename-format\": \"raw\""),
            "{info}"
        );
        check_clean(&p);
        let img = open(&p, true);
        let long = "n".repeat(1000);
        let r = img.set_backing(Some(&BackingFile {
            name: long,
            format: None,
        }));
        if opts == "cluster_size=512" {
            assert!(r.is_err());
        }
        img.set_backing(None).unwrap();
        drop(img);
        let mut buf = std::fs::read(&p).unwrap();
        buf.truncate(4096);
        let h2 = super::header::Header::parse(&buf, |_| Ok(buf.clone())).unwrap();
        assert!(h2.extension(0x1234_5678).is_some(), "{opts}");
        assert_eq!(h2.backing, None);
        assert_eq!(h2.backing_format(), None);
        check_clean(&p);
    }
}

#[test]
fn concurrent_writers_share_subclustered_clusters() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let p = dir.path().join("c.qcow2");
    let size = 8u64 << 20;
    create(&p, size, None, "extended_l2=on,cluster_size=64k");
    let img = std::sync::Arc::new(open(&p, true));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                // Thread t writes subclusters t, t+4, t+8... of every cluster.
                let sc = 2048u64;
                let mut off = t * sc;
                while off < size {
                    img.write(off, &vec![t as u8 + 1; sc as usize], &Zeros)
                        .unwrap();
                    off += 4 * sc * 3;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut model = vec![0u8; size as usize];
    for t in 0..4u64 {
        let mut off = t * 2048;
        while off < size {
            model[off as usize..(off + 2048) as usize].fill(t as u8 + 1);
            off += 4 * 2048 * 3;
        }
    }
    img.flush().unwrap();
    drop(img);
    check_clean(&p);
    compare_to_model(&p, &model, dir.path());
}

#[test]
fn feature_bits_on_open() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let p = dir.path().join("f.qcow2");
    create(&p, 4 << 20, None, "");
    let header = |p: &Path| {
        let mut buf = std::fs::read(p).unwrap();
        buf.truncate(65536);
        super::header::Header::parse(&buf, |_| Ok(buf.clone())).unwrap()
    };
    // An unknown incompatible bit is refused by its feature-table name.
    let mut h = header(&p);
    let mut table = h.extensions[0].data.clone();
    let mut e = [0u8; 48];
    e[0] = 0;
    e[1] = 9;
    e[2..15].copy_from_slice(b"fancy feature");
    table.extend_from_slice(&e);
    h.extensions[0].data = table;
    h.incompatible |= 1 << 9;
    write_at(&p, 0, &h.encode().unwrap());
    let err = open_err(&p, false);
    assert!(err.contains("'fancy feature' (bit 9)"), "{err}");
    // Unknown autoclear bits are cleared by a writable open only.
    h.incompatible &= !(1 << 9);
    h.autoclear = 1 << 7 | 1 << 30;
    write_at(&p, 0, &h.encode().unwrap());
    drop(open(&p, false));
    assert_eq!(header(&p).autoclear, 1 << 7 | 1 << 30);
    drop(open(&p, true));
    assert_eq!(header(&p).autoclear, 0);
    check_clean(&p);
    // Persistent bitmaps: a writable open marks them inconsistent.
    let b = dir.path().join("b.qcow2");
    create(&b, 4 << 20, None, "");
    qemu_img(&["bitmap", "--add", b.to_str().unwrap(), "bm0"]);
    assert_eq!(header(&b).autoclear, 1);
    {
        let img = open(&b, true);
        img.write(0, &[1u8; 4096], &Zeros).unwrap();
    }
    let h = header(&b);
    assert_eq!(h.autoclear, 0);
    assert!(h.extension(super::header::EXT_BITMAPS).is_some());
    let (_, s) = run("qemu-img", &["check", b.to_str().unwrap()]);
    assert!(!s.contains("ERROR"), "{s}");
}

#[test]
fn large_l1_tables_with_small_clusters() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let p = dir.path().join("l.qcow2");
    // 5 MiB of L1 table in 512-byte clusters: many refcount blocks and a
    // multi-cluster refcount table at creation.
    let size = 20u64 << 30;
    create(&p, size, None, "cluster_size=512,refcount_bits=64");
    check_clean(&p);
    {
        let img = open(&p, true);
        img.write(size - 5000, &[7u8; 5000], &Zeros).unwrap();
        img.write(1 << 30, &[8u8; 70000], &Zeros).unwrap();
        let mut b = vec![0u8; 5000];
        img.read(size - 5000, &mut b, &Zeros).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }
    check_clean(&p);
    let img = open(&p, false);
    assert_eq!(our_map(&img), qemu_map(&p));
    // Too large for the L1 limit: a clear error.
    let e = Image::create(
        dir.path().join("x.qcow2"),
        &CreateOptions {
            format: Format::Qcow2,
            size: 1 << 50,
            backing: None,
            options: kv("cluster_size=512"),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
}

#[test]
fn corrupted_images_never_panic() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let good = dir.path().join("good.qcow2");
    create(&good, 2 << 20, None, "cluster_size=4k,extended_l2=off");
    qemu_io(
        &good,
        &[
            "write -P 1 0 64k".into(),
            "write -c -P 2 64k 16k".into(),
            "write -z 128k 8k".into(),
        ],
    );
    let orig = std::fs::read(&good).unwrap();
    let p = dir.path().join("bad.qcow2");
    let mut rng = Rng(12345);
    let mut opened = 0;
    for i in 0..300 {
        let mut img = orig.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the header and metadata clusters, sometimes anywhere.
            let at = if rng.below(3) == 0 {
                rng.below(img.len() as u64)
            } else {
                rng.below(5 * 4096)
            } as usize;
            img[at] ^= 1 << rng.below(8);
            if rng.below(4) == 0 {
                img[at] = 0xff;
            }
        }
        if i % 7 == 0 {
            img.truncate(rng.below(img.len() as u64) as usize);
        }
        std::fs::write(&p, &img).unwrap();
        let writable = i % 2 == 0;
        if let Ok(im) = Image::open(
            &p,
            &OpenOptions {
                writable,
                format: Some(Format::Qcow2),
                ..Default::default()
            },
        ) {
            opened += 1;
            let size = im.virtual_size().min(4 << 20);
            let mut buf = vec![0u8; size as usize];
            let _ = im.read(0, &mut buf, &Zeros);
            if writable && size > 70000 {
                let _ = im.write(3000, &[9u8; 70000], &Zeros);
                let _ = im.write_zeroes(0, 8192, &Zeros);
            }
        }
    }
    assert!(opened > 50, "only {opened} corrupted images opened");
}

#[test]
fn ranges_prepared_together_get_one_allocation() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let cs = 65536u64;
    for opts in ["cluster_size=64k", "extended_l2=on,cluster_size=64k"] {
        let p = dir.path().join("many.qcow2");
        let _ = std::fs::remove_file(&p);
        let size = 64 * cs;
        create(&p, size, None, opts);
        qemu_io(&p, &[format!("write -P 0x11 {} {}", 10 * cs, cs)]);
        let mut model = vec![0u8; size as usize];
        model[(10 * cs) as usize..(11 * cs) as usize].fill(0x11);
        let img = open(&p, true);
        let g = img.driver().granularity();
        // Disjoint ranges in order: new clusters, an allocated cluster,
        // more new clusters, and two granules of one cluster (with
        // subclusters they share it).
        let ranges = [
            (2 * cs, 2 * cs),
            (10 * cs, cs),
            (20 * cs, 3 * cs),
            (30 * cs, g),
            (30 * cs + 2 * g, g),
        ];
        let runs = img.driver().prepare_write_many(&ranges).unwrap();
        let covered: u64 = runs.iter().map(|r| r.len).sum();
        assert_eq!(covered, ranges.iter().map(|r| r.1).sum::<u64>(), "{opts}");
        assert!(
            runs.iter().all(|r| r.fresh != (r.guest / cs == 10)),
            "{opts}: {runs:?}"
        );
        // The new host clusters, in the order of the ranges, are
        // consecutive: one allocation.
        let mut clusters: Vec<(u64, u64)> = Vec::new();
        for r in runs.iter().filter(|r| r.fresh) {
            for ci in r.guest / cs..(r.guest + r.len).div_ceil(cs) {
                // Host offset of the start of guest cluster `ci`.
                let c = (ci, r.host + ci * cs - r.guest);
                if clusters.last() != Some(&c) {
                    clusters.push(c);
                }
            }
        }
        let want = if g < cs { 6 } else { 7 };
        assert_eq!(clusters.len(), want, "{opts}: {runs:?}");
        for w in clusters.windows(2) {
            assert_eq!(w[1].1, w[0].1 + cs, "{opts}: {runs:?}");
        }
        for (i, r) in runs.iter().enumerate() {
            let data = vec![0x40 + i as u8; r.len as usize];
            img.storage().write_at(&data, r.host).unwrap();
            model[r.guest as usize..(r.guest + r.len) as usize].copy_from_slice(&data);
        }
        img.driver().commit_write(&runs).unwrap();
        img.flush().unwrap();
        drop(img);
        check_clean(&p);
        compare_to_model(&p, &model, dir.path());
    }
}
