//! qemu-based tests of the QED driver: images written by qemu-io read back
//! as `qemu-img convert` does and map as `qemu-img map` does; images we
//! write pass `qemu-img check` and `qemu-img compare` against a model.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::header::{F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK};
use super::*;
use crate::image::{CreateOptions, GuestRead, Image, OpenOptions, Zeros};
use crate::storage::SyncFile;

// ---------------------------------------------------------------- helpers

fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a command that must succeed; its stdout.
fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io with a list of `-c` commands.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qed"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    ok("qemu-io", &args);
}

fn qemu_create(img: &Path, size: u64, opts: &str) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qed"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), &size]);
    ok("qemu-img", &args);
}

/// `qemu-img check` must report a clean image.
fn assert_check_clean(img: &Path) {
    let out = run("qemu-img", &["check", "-f", "qed", s(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check {}: {text}",
        img.display()
    );
}

/// The guest content of `img` as qemu sees it.
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("converted.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "qed", "-O", "raw", s(img), s(&raw)],
    );
    let data = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    data
}

fn open(p: &Path, writable: bool) -> Image {
    Image::open(
        p,
        &OpenOptions {
            writable,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(img: &Image, below: &dyn GuestRead) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read(0, &mut buf, below).unwrap();
    buf
}

/// Reads the raw content of a file as a backing chain (zeros past its end).
struct RawFile(File);

impl GuestRead for RawFile {
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        crate::storage::pread_full(&self.0, buf, offset)
            .map_err(|e| crate::Error::io("reading backing", e))
    }
}

/// One layer's view of an extent, comparable with `qemu-img map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum M {
    Data(u64),
    Zero,
    Unalloc,
}

/// Merge adjacent extents with the same status (data only when contiguous).
fn normalize(v: Vec<(u64, u64, M)>) -> Vec<(u64, u64, M)> {
    let mut out: Vec<(u64, u64, M)> = Vec::new();
    for (start, len, m) in v {
        if let Some(last) = out.last_mut() {
            let same = match (last.2, m) {
                (M::Data(a), M::Data(b)) => a + last.1 == b,
                (a, b) => a == b,
            };
            if same && last.0 + last.1 == start {
                last.1 += len;
                continue;
            }
        }
        out.push((start, len, m));
    }
    out
}

fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\": ");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// `qemu-img map` of `img`, seen from its top layer.
fn qemu_map(img: &Path) -> Vec<(u64, u64, M)> {
    let out = ok("qemu-img", &["map", "-f", "qed", "--output=json", s(img)]);
    let mut v = Vec::new();
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        let num = |k| json_field(line, k).unwrap().parse::<u64>().unwrap();
        let flag = |k| json_field(line, k) == Some("true");
        let m = if num("depth") != 0 {
            M::Unalloc
        } else if flag("data") {
            M::Data(num("offset"))
        } else if flag("present") && flag("zero") {
            M::Zero
        } else {
            M::Unalloc
        };
        v.push((num("start"), num("length"), m));
    }
    normalize(v)
}

/// Our block status over the whole image.
fn our_map(img: &Image) -> Vec<(u64, u64, M)> {
    let size = img.virtual_size();
    let mut v = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img.block_status(pos, size - pos).unwrap();
        assert_eq!(e.offset, pos);
        assert!(e.len > 0);
        let m = match e.status {
            Status::Data { host } => M::Data(host),
            Status::Zero { host: None } => M::Zero,
            Status::Unallocated { .. } => M::Unalloc,
            other => panic!("unexpected status {other:?}"),
        };
        v.push((pos, e.len, m));
        pos = e.end();
    }
    normalize(v)
}

fn header_features(p: &Path) -> u64 {
    let b = fs::read(p).unwrap();
    u64::from_le_bytes(b[16..24].try_into().unwrap())
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_u64(p: &Path, at: u64) -> u64 {
    let f = File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `-o` options as key/value pairs.
type Opts<'a> = &'a [(&'a str, &'a str)];

fn create_ours(p: &Path, size: u64, backing: Option<BackingFile>, opts: &[(&str, &str)]) {
    Image::create(
        p,
        &CreateOptions {
            format: Format::Qed,
            size,
            backing,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .unwrap();
}

// ------------------------------------------------------------------ tests

#[test]
fn reads_qemu_written_images_like_qemu() {
    let dir = tempdir();
    // (cluster size, table size, image size): sizes not cluster multiples,
    // and large enough for several L2 tables where clusters are small.
    let cases: [(u64, u64, u64); 4] = [
        (4096, 4, (20 << 20) - 1536),
        (65536, 4, (9 << 20) + 512),
        (65536, 16, 12 << 20),
        (1 << 20, 16, (19 << 19) + 4096),
    ];
    for (cs, ts, size) in cases {
        let img = dir.path().join(format!("q-{cs}-{ts}.qed"));
        qemu_create(&img, size, &format!("cluster_size={cs},table_size={ts}"));
        let last = size - 4096;
        let cmds = [
            "write -P 0xab 0 64k".to_string(),
            "write -z 1M 128k".to_string(),
            format!("write -P 0x11 {} 4k", (3 << 20) - 512),
            "write -z 5M 4k".to_string(),
            format!("write -P 0x22 {last} 4k"),
            "write -P 0x33 6M 1M".to_string(),
            // Across the first L2 table boundary of 4 KiB clusters.
            "write -P 0x44 8380416 16k".to_string(),
            "write -z 6M 64k".to_string(),
            "write -P 0x55 7M 8k".to_string(),
        ];
        let cmds: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
        qemu_io(&img, &cmds);
        let image = open(&img, false);
        assert_eq!(image.virtual_size(), size);
        let info = image.info();
        assert_eq!(info.cluster_size, Some(cs));
        assert!(!info.dirty);
        assert_eq!(info.backing, None);
        assert!(info.format_specific.is_empty());
        let ours = read_all(&image, &Zeros);
        assert!(ours == qemu_raw(&img, dir.path()), "content {cs}/{ts}");
        assert_eq!(our_map(&image), qemu_map(&img), "map {cs}/{ts}");
        // Partial-range queries are clipped to the request.
        let e = image.block_status(4096, 8192).unwrap();
        assert_eq!((e.offset, e.len), (4096, 8192));
        assert_eq!(image.driver().granularity(), cs);
        assert!(image.driver().read_compressed(0, &mut [0u8; 16]).is_err());
    }
}

#[test]
fn skips_unallocated_l2_tables_at_once() {
    let dir = tempdir();
    let img = dir.path().join("sparse.qed");
    // 4 KiB clusters, 16-cluster tables: 32 MiB per L2 table, 6400 of them.
    let size: u64 = 200 << 30;
    qemu_create(&img, size, "cluster_size=4096,table_size=16");
    qemu_io(&img, &["write -P 1 1G 4k", "write -z 2G 8k"]);
    let image = open(&img, false);
    let e = image.block_status(0, size).unwrap();
    assert_eq!(
        (e.len, e.status),
        (1 << 30, Status::Unallocated { host: None })
    );
    let e = image.block_status(1 << 30, 1 << 30).unwrap();
    assert_eq!(e.len, 4096);
    assert!(matches!(e.status, Status::Data { .. }));
    let e = image.block_status((2 << 30) + 4096, 1 << 30).unwrap();
    assert_eq!((e.len, e.status), (4096, Status::Zero { host: None }));
    let e = image
        .block_status((2 << 30) + 8192, size - (2 << 30) - 8192)
        .unwrap();
    assert_eq!(e.len, size - (2 << 30) - 8192);
    assert_eq!(our_map(&image), qemu_map(&img));
}

/// Random writes, partial clusters and zeroing through [`Image`] over a
/// backing file; the result must pass `qemu-img check`, compare equal to a
/// model and map like `qemu-img map`.
fn random_writes(cs: u64, ts: u64, backing_fmt: &str, seed: u64) {
    let dir = tempdir();
    let size: u64 = 24 * cs + 3 * 512;
    let base = dir.path().join(format!("base.{backing_fmt}"));
    // The backing file is smaller than the image: its tail reads as zeros.
    let base_size = (size / 2).to_string();
    ok(
        "qemu-img",
        &["create", "-q", "-f", backing_fmt, s(&base), &base_size],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            backing_fmt,
            "-c",
            &format!("write -P 0x5a 0 {}", size / 4),
            "-c",
            &format!("write -P 0xa5 {} {}", size / 3, cs + 512),
            s(&base),
        ],
    );
    let base_raw = dir.path().join("base.raw.content");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            backing_fmt,
            "-O",
            "raw",
            s(&base),
            s(&base_raw),
        ],
    );
    let mut model = fs::read(&base_raw).unwrap();
    model.resize(size as usize, 0);
    let below = RawFile(File::open(&base_raw).unwrap());

    let img = dir.path().join("top.qed");
    let fmt = (backing_fmt == "raw").then(|| "raw".to_string());
    create_ours(
        &img,
        size,
        Some(BackingFile {
            name: s(&base).to_string(),
            format: fmt.clone(),
        }),
        &[
            ("cluster_size", &cs.to_string()),
            ("table_size", &ts.to_string()),
        ],
    );
    let image = open(&img, true);
    assert_eq!(image.info().backing.unwrap().format, fmt);
    let mut rng = Rng(seed);
    for i in 0..40 {
        let off = rng.below(size);
        let len = (1 + rng.below(3 * cs)).min(size - off);
        if rng.below(4) == 0 {
            image.write_zeroes(off, len, &below).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data: Vec<u8> = (0..len).map(|j| (i * 7 + j % 251) as u8 ^ 0x3c).collect();
            image.write(off, &data, &below).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        assert_ne!(header_features(&img) & F_NEED_CHECK, 0);
    }
    // The last cluster of the image (a partial one).
    image.write(size - 512, &[0xee; 512], &below).unwrap();
    model[(size - 512) as usize..].fill(0xee);
    image.flush().unwrap();
    assert!(!image.info().dirty);
    assert_eq!(header_features(&img) & F_NEED_CHECK, 0);
    assert!(read_all(&image, &below) == model);
    let ours = our_map(&image);
    drop(image);
    assert_eq!(fs::metadata(&img).unwrap().len() % cs, 0);

    let model_path = dir.path().join("model.raw");
    fs::write(&model_path, &model).unwrap();
    if ts > 1 {
        assert_check_clean(&img);
        ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qed",
                "-F",
                "raw",
                s(&img),
                s(&model_path),
            ],
        );
        assert_eq!(ours, qemu_map(&img));
    } else {
        // QEMU cannot open images with one-cluster tables (its table offset
        // check rejects them); check by reopening with our own reader.
        let again = open(&img, false);
        assert!(read_all(&again, &below) == model);
        assert_eq!(our_map(&again), ours);
    }
}

#[test]
fn random_writes_4k_table1_over_raw() {
    random_writes(4096, 1, "raw", 1);
}

#[test]
fn random_writes_4k_table16_over_qcow2() {
    random_writes(4096, 16, "qcow2", 2);
}

#[test]
fn random_writes_64k_table4_over_raw() {
    random_writes(65536, 4, "raw", 3);
}

#[test]
fn random_writes_1m_table16_over_qed() {
    random_writes(1 << 20, 16, "qed", 4);
}

#[test]
fn zeroing_without_backing_matches_qemu() {
    let dir = tempdir();
    let img = dir.path().join("z.qed");
    create_ours(&img, 4 << 20, None, &[]);
    let image = open(&img, true);
    image.write(0, &[7u8; 65536], &Zeros).unwrap();
    // Whole clusters: unallocated → zero cluster, data → zeroed in place.
    image.write_zeroes(0, 3 << 16, &Zeros).unwrap();
    // Partial cluster: written as zero data.
    image.write_zeroes((1 << 20) + 512, 1024, &Zeros).unwrap();
    image.flush().unwrap();
    let map = our_map(&image);
    assert!(matches!(map[0], (0, 65536, M::Data(_))));
    assert_eq!(map[1], (65536, 2 << 16, M::Zero));
    assert_eq!(read_all(&image, &Zeros), vec![0u8; 4 << 20]);
    drop(image);
    assert_check_clean(&img);
    assert_eq!(map, qemu_map(&img));
}

#[test]
fn concurrent_writers_stay_consistent() {
    let dir = tempdir();
    let img = dir.path().join("mt.qed");
    let cs = 4096u64;
    let size = 64 << 20;
    create_ours(
        &img,
        size,
        None,
        &[("cluster_size", "4k"), ("table_size", "4")],
    );
    let image = Arc::new(open(&img, true));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let image = Arc::clone(&image);
            std::thread::spawn(move || {
                let mut rng = Rng(100 + t);
                // Each thread owns every fourth 1 MiB stripe.
                for i in 0..60u64 {
                    let stripe = (rng.below(16) * 4 + t) << 20;
                    let off = stripe + rng.below((1 << 20) - 3 * cs);
                    let len = 1 + rng.below(3 * cs);
                    let data = vec![(t * 16 + i % 16) as u8 | 1; len as usize];
                    image.write(off, &data, &Zeros).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    image.flush().unwrap();
    let ours = read_all(&image, &Zeros);
    let map = our_map(&image);
    drop(image);
    assert_check_clean(&img);
    assert!(ours == qemu_raw(&img, dir.path()));
    assert_eq!(map, qemu_map(&img));
}

#[test]
fn need_check_left_by_killed_qemu_is_repaired() {
    let dir = tempdir();
    let img = dir.path().join("k.qed");
    qemu_create(&img, 8 << 20, "");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 3M 128k",
            "-c",
            "sigraise 9",
            s(&img),
        ],
    );
    assert!(!out.status.success());
    assert_ne!(header_features(&img) & F_NEED_CHECK, 0);
    // Read-only opens leave the image alone.
    let ro = open(&img, false);
    assert!(!ro.info().dirty, "qemu-img shows no dirty flag for QED");
    let content = read_all(&ro, &Zeros);
    drop(ro);
    assert_ne!(header_features(&img) & F_NEED_CHECK, 0);
    // A writable open checks and clears the bit.
    let rw = open(&img, true);
    assert!(!rw.info().dirty);
    assert_eq!(header_features(&img) & F_NEED_CHECK, 0);
    assert!(read_all(&rw, &Zeros) == content);
    assert!(content[..65536].iter().all(|&b| b == 0xab));
    drop(rw);
    assert_check_clean(&img);
    assert!(qemu_raw(&img, dir.path()) == content);
}

/// Open the driver directly, without the image layer's file locks.
fn open_driver(p: &Path, writable: bool) -> Qed {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(p)
        .unwrap();
    Qed::open(Box::new(SyncFile::new(f)), writable).unwrap()
}

/// Write `data` at cluster-aligned `offset` through the driver interface.
fn driver_write(q: &Qed, offset: u64, data: &[u8]) {
    let runs = q.prepare_write(offset, data.len() as u64).unwrap();
    for r in &runs {
        let at = (r.guest - offset) as usize;
        q.storage()
            .write_at(&data[at..at + r.len as usize], r.host)
            .unwrap();
    }
    q.commit_write(&runs).unwrap();
}

#[test]
fn our_own_unflushed_writes_leave_a_checkable_image() {
    let dir = tempdir();
    let img = dir.path().join("crash.qed");
    create_ours(&img, 8 << 20, None, &[]);
    let q = open_driver(&img, true);
    driver_write(&q, 0, &[9u8; 3 * 65536]);
    driver_write(&q, 5 << 20, &[8u8; 65536]);
    assert!(q.zero_range(2 << 20, 1 << 20).unwrap());
    assert_ne!(header_features(&img) & F_NEED_CHECK, 0);
    // A crash: no flush, no close.
    std::mem::forget(q);
    assert_check_clean(&img);
    let mut expect = vec![0u8; 8 << 20];
    expect[..3 * 65536].fill(9);
    expect[5 << 20..(5 << 20) + 65536].fill(8);
    let rw = open(&img, true);
    assert!(read_all(&rw, &Zeros) == expect);
    drop(rw);
    assert_eq!(header_features(&img) & F_NEED_CHECK, 0);
    assert_check_clean(&img);
    assert!(qemu_raw(&img, dir.path()) == expect);
}

#[test]
fn repair_clears_invalid_entries() {
    let dir = tempdir();
    let img = dir.path().join("r.qed");
    // 4 KiB clusters, 4-cluster tables: 2048 entries, 8 MiB per L2 table.
    qemu_create(&img, 20 << 20, "cluster_size=4k,table_size=4");
    qemu_io(&img, &["write -P 0x77 0 8k", "write -P 0x78 9M 4k"]);
    let good = qemu_raw(&img, dir.path());
    let l1 = 4096u64;
    let l2 = read_u64(&img, l1);
    let len = fs::metadata(&img).unwrap().len();
    // Unused L2 slots: past the end of the file, misaligned.
    patch(&img, l2 + 5 * 8, &(len + 4096).to_le_bytes());
    patch(&img, l2 + 6 * 8, &(l2 + 100).to_le_bytes());
    // An L1 entry whose table would end past the end of the file.
    patch(&img, l1 + 2 * 8, &(len - 4096).to_le_bytes());
    let f = header_features(&img) | F_NEED_CHECK;
    patch(&img, 16, &f.to_le_bytes());

    // Read-only: the bad entries are errors when reached, not panics.
    let ro = open(&img, false);
    let e = ro.block_status(5 * 4096, 4096).unwrap_err();
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    let e = ro.block_status(6 * 4096, 4096).unwrap_err();
    assert!(e.to_string().contains("not cluster-aligned"), "{e}");
    let e = ro.block_status(16 << 20, 4096).unwrap_err();
    assert!(e.to_string().contains("L2 table offset"), "{e}");
    // A run stops before a bad entry instead of failing.
    let e = ro.block_status(8192, 1 << 20).unwrap();
    assert_eq!(
        (e.len, e.status),
        (3 * 4096, Status::Unallocated { host: None })
    );
    drop(ro);

    let rw = open(&img, true);
    assert!(!rw.info().dirty);
    assert!(read_all(&rw, &Zeros) == good);
    drop(rw);
    assert_eq!(read_u64(&img, l2 + 5 * 8), 0);
    assert_eq!(read_u64(&img, l2 + 6 * 8), 0);
    assert_eq!(read_u64(&img, l1 + 2 * 8), 0);
    assert_check_clean(&img);
}

#[test]
fn duplicate_references_refuse_writable_open() {
    let dir = tempdir();
    let img = dir.path().join("dup.qed");
    qemu_create(&img, 4 << 20, "");
    qemu_io(&img, &["write -P 0x61 0 64k"]);
    let l2 = read_u64(&img, 65536);
    let data = read_u64(&img, l2);
    patch(&img, l2 + 8, &data.to_le_bytes());
    let f = header_features(&img) | F_NEED_CHECK;
    patch(&img, 16, &f.to_le_bytes());
    let e = Image::open(
        &img,
        &OpenOptions {
            writable: true,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    // The failed open must not have cleared the mark.
    assert_ne!(header_features(&img) & F_NEED_CHECK, 0);
    let ro = open(&img, false);
    let mut buf = vec![0u8; 65536];
    ro.read(65536, &mut buf, &Zeros).unwrap();
    assert!(buf.iter().all(|&b| b == 0x61));
}

fn info_json(img: &Path) -> String {
    ok("qemu-img", &["info", "-U", "--output=json", s(img)])
}

#[test]
fn set_backing_round_trip() {
    let dir = tempdir();
    let img = dir.path().join("sb.qed");
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    create_ours(&img, 1 << 20, None, &[]);
    let image = open(&img, true);
    image
        .set_backing(Some(&BackingFile {
            name: "base.raw".into(),
            format: Some("raw".into()),
        }))
        .unwrap();
    let info = image.info();
    assert_eq!(
        info.backing,
        Some(BackingFile {
            name: "base.raw".into(),
            format: Some("raw".into())
        })
    );
    let j = info_json(&img);
    assert!(j.contains("\"backing-filename\": \"base.raw\""), "{j}");
    assert!(j.contains("\"backing-filename-format\": \"raw\""), "{j}");
    assert_eq!(
        header_features(&img) & (F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE),
        F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE
    );
    // A format QED cannot record: the name only, probed on open.
    image
        .set_backing(Some(&BackingFile {
            name: "base.raw".into(),
            format: Some("qcow2".into()),
        }))
        .unwrap();
    assert_eq!(image.info().backing.unwrap().format, None);
    assert_eq!(header_features(&img) & F_BACKING_FORMAT_NO_PROBE, 0);
    let j = info_json(&img);
    assert!(j.contains("\"backing-filename\": \"base.raw\""), "{j}");
    assert!(!j.contains("backing-filename-format"), "{j}");
    // Too long for the 64 KiB header cluster.
    let long = "x".repeat(5000);
    let e = image
        .set_backing(Some(&BackingFile {
            name: long,
            format: None,
        }))
        .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    image.set_backing(None).unwrap();
    assert_eq!(image.info().backing, None);
    drop(image);
    assert_eq!(
        header_features(&img) & (F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE),
        0
    );
    let j = info_json(&img);
    assert!(!j.contains("backing-filename"), "{j}");
    assert_check_clean(&img);
    // Reopened, the header says the same.
    assert_eq!(open(&img, false).info().backing, None);
}

#[test]
fn create_matches_qemu_img() {
    let dir = tempdir();
    let cases: [(&str, u64, Opts); 6] = [
        ("", 10 << 20, &[]),
        ("cluster_size=4k", 1000, &[("cluster_size", "4k")]),
        (
            "cluster_size=1M,table_size=16",
            3 << 30,
            &[("cluster_size", "1M"), ("table_size", "16")],
        ),
        (
            "backing_file=base.img,backing_fmt=raw",
            1 << 20,
            &[("backing_file", "base.img"), ("backing_fmt", "raw")],
        ),
        (
            "backing_file=other.img,backing_fmt=qcow2",
            1 << 20,
            &[("backing_file", "other.img"), ("backing_fmt", "qcow2")],
        ),
        ("table_size=16", 0, &[("table_size", "16")]),
    ];
    for (i, (qopts, size, opts)) in cases.iter().enumerate() {
        let theirs = dir.path().join(format!("theirs{i}.qed"));
        let ours = dir.path().join(format!("ours{i}.qed"));
        let size_s = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qed", "-u"];
        if !qopts.is_empty() {
            args.extend(["-o", qopts]);
        }
        args.extend([s(&theirs), &size_s]);
        ok("qemu-img", &args);
        create_ours(&ours, *size, None, opts);
        let a = fs::read(&theirs).unwrap();
        let b = fs::read(&ours).unwrap();
        assert_eq!(a.len(), b.len(), "{qopts}");
        assert!(a == b, "{qopts}: files differ");
        let strip = |j: String| -> Vec<String> {
            j.lines()
                .filter(|l| !l.contains("filename") && !l.contains("actual-size"))
                .map(String::from)
                .collect()
        };
        if !qopts.contains("backing") {
            assert_check_clean(&ours);
            assert_eq!(
                strip(info_json(&ours)),
                strip(info_json(&theirs)),
                "{qopts}"
            );
        }
    }
    // The backing file may also come as the argument.
    let p = dir.path().join("arg.qed");
    create_ours(
        &p,
        1 << 20,
        Some(BackingFile {
            name: "base.img".into(),
            format: Some("raw".into()),
        }),
        &[],
    );
    assert!(fs::read(&p).unwrap() == fs::read(dir.path().join("theirs3.qed")).unwrap());
}

#[test]
fn create_rejects_bad_options() {
    let dir = tempdir();
    let p = dir.path().join("bad.qed");
    let bad: [(Opts, u64, &str); 7] = [
        (&[("foo", "1")], 1 << 20, "invalid option 'foo'"),
        (&[("table_size", "3")], 1 << 20, "table size"),
        (&[("table_size", "4k")], 1 << 20, "integer"),
        (&[("cluster_size", "1000")], 1 << 20, "cluster size"),
        (&[("cluster_size", "128M")], 1 << 20, "cluster size"),
        (
            &[("cluster_size", "64M"), ("table_size", "16")],
            0,
            "overflows",
        ),
        (&[], 1 << 50, "too large"),
    ];
    for (opts, size, msg) in bad {
        let e = Image::create(
            &p,
            &CreateOptions {
                format: Format::Qed,
                size,
                backing: None,
                options: opts
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains(msg), "{opts:?}: {e}");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
    }
}

/// A valid 1 MiB image made by qemu-img, as bytes to corrupt.
fn sample_bytes(dir: &Path) -> Vec<u8> {
    let p = dir.join("sample.qed");
    qemu_create(&p, 1 << 20, "cluster_size=4k,table_size=4");
    qemu_io(&p, &["write -P 1 0 4k"]);
    fs::read(&p).unwrap()
}

fn open_bytes(dir: &Path, bytes: &[u8], writable: bool) -> crate::Result<Qed> {
    let p = dir.join("bad.qed");
    fs::write(&p, bytes).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&p)
        .unwrap();
    Qed::open(Box::new(SyncFile::new(f)), writable)
}

#[test]
fn bad_headers_are_clear_errors() {
    let dir = tempdir();
    let good = sample_bytes(dir.path());
    assert!(open_bytes(dir.path(), &good, false).is_ok());
    let set32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let set64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Patch, &str)> = vec![
        (Box::new(|b| b.truncate(40)), "truncated"),
        (Box::new(|b| b.truncate(2)), "bad magic"),
        (Box::new(|b| b[0] = b'X'), "bad magic"),
        (Box::new(move |b| set64(b, 16, 0x30)), "feature bits 0x30"),
        (Box::new(move |b| set32(b, 4, 5000)), "cluster size"),
        (Box::new(move |b| set32(b, 4, 1 << 30)), "cluster size"),
        (Box::new(move |b| set32(b, 8, 3)), "table size"),
        (Box::new(move |b| set32(b, 8, 0)), "table size"),
        (Box::new(move |b| set32(b, 12, 0x7fff_ffff)), "too large"),
        (Box::new(move |b| set32(b, 12, 100)), "L1 table offset"),
        (Box::new(move |b| set64(b, 40, 1 << 40)), "L1 table offset"),
        (Box::new(move |b| set64(b, 40, 4097)), "L1 table offset"),
        (Box::new(|b| b.truncate(4096 + 8000)), "L1 table offset"),
        (Box::new(move |b| set64(b, 48, 1 << 62)), "exceeds"),
        (Box::new(move |b| set64(b, 48, 1000)), "multiple of 512"),
        (
            Box::new(move |b| {
                set64(b, 16, 1);
                set32(b, 56, 4000);
                set32(b, 60, 200);
            }),
            "outside",
        ),
        (
            Box::new(move |b| {
                set64(b, 16, 1);
                set32(b, 12, 2);
                set64(b, 40, 8192);
                set32(b, 56, 64);
                set32(b, 60, 5000);
            }),
            "too long",
        ),
    ];
    for (f, msg) in cases {
        let mut b = good.clone();
        f(&mut b);
        let e = open_bytes(dir.path(), &b, false).unwrap_err();
        assert!(e.to_string().contains(msg), "expected '{msg}': {e}");
    }
}

#[test]
fn autoclear_bits_are_cleared_when_writable() {
    let dir = tempdir();
    let mut b = sample_bytes(dir.path());
    b[32..40].copy_from_slice(&0x8001u64.to_le_bytes());
    let p = dir.path().join("bad.qed");
    assert!(open_bytes(dir.path(), &b, false).is_ok());
    assert_eq!(read_u64(&p, 32), 0x8001);
    assert!(open_bytes(dir.path(), &b, true).is_ok());
    assert_eq!(read_u64(&p, 32), 0);
    // Unknown compat bits are ignored.
    b[24..32].copy_from_slice(&0x10u64.to_le_bytes());
    assert!(open_bytes(dir.path(), &b, true).is_ok());
}

#[test]
fn bad_data_offsets_fail_on_access() {
    let dir = tempdir();
    let b = sample_bytes(dir.path());
    let p = dir.path().join("bad.qed");
    let q = open_bytes(dir.path(), &b, false).unwrap();
    assert!(matches!(
        q.block_status(0, 4096).unwrap().status,
        Status::Data { .. }
    ));
    let l2 = read_u64(&p, 4096);
    drop(q);
    let mut b2 = b.clone();
    b2[l2 as usize..l2 as usize + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let q = open_bytes(dir.path(), &b2, false).unwrap();
    let e = q.block_status(0, 4096).unwrap_err();
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    // The L1 entry itself pointing past the end.
    let mut b3 = b.clone();
    b3[4096..4104].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let q = open_bytes(dir.path(), &b3, false).unwrap();
    let e = q.block_status(0, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("L2 table offset"), "{e}");
    // Writes are refused on a read-only image, and misaligned ranges.
    let q = open_bytes(dir.path(), &b, true).unwrap();
    assert!(q.prepare_write(100, 4096).is_err());
    assert!(q.prepare_write(0, 100).is_err());
    assert!(q.zero_range(0, 1 << 21).is_err());
    assert!(q
        .commit_write(&[HostRun {
            guest: 0,
            host: 1 << 20,
            len: 4096,
            fresh: true
        }])
        .is_err());
    let ro = open_bytes(dir.path(), &b, false).unwrap();
    assert!(ro.prepare_write(0, 4096).is_err());
}

#[test]
fn prepare_write_allocates_contiguous_runs() {
    let dir = tempdir();
    let img = dir.path().join("runs.qed");
    create_ours(&img, 1 << 20, None, &[("cluster_size", "4k")]);
    let image = open(&img, true);
    // Allocate cluster 2 first, so that 0..6 is fresh / data / fresh.
    image.write(2 * 4096, &[1u8; 4096], &Zeros).unwrap();
    let d = image.driver();
    let runs = d.prepare_write(0, 6 * 4096).unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs[0].fresh && !runs[1].fresh && runs[2].fresh);
    assert_eq!((runs[0].guest, runs[0].len), (0, 8192));
    assert_eq!((runs[2].guest, runs[2].len), (3 * 4096, 3 * 4096));
    for r in &runs {
        d.storage()
            .write_at(&vec![r.guest as u8 / 16 + 2; r.len as usize], r.host)
            .unwrap();
    }
    d.commit_write(&runs).unwrap();
    // A run is committed once.
    assert!(d.commit_write(&runs).is_err());
    let e = image.block_status(3 * 4096, 3 * 4096).unwrap();
    assert_eq!(
        (e.len, e.status),
        (3 * 4096, Status::Data { host: runs[2].host })
    );
    image.flush().unwrap();
    drop(image);
    assert_check_clean(&img);
}

#[test]
fn ranges_prepared_together_get_one_contiguous_allocation() {
    let dir = tempdir();
    let img = dir.path().join("many.qed");
    let cs = 65536u64;
    // Not a multiple of the cluster size: the last range ends at the
    // virtual size.
    let size = 40 * cs + 4096;
    qemu_create(&img, size, "cluster_size=65536");
    qemu_io(&img, &[&format!("write -P 0x11 {} {}", 10 * cs, cs)]);
    let mut expect = vec![0u8; size as usize];
    expect[(10 * cs) as usize..(11 * cs) as usize].fill(0x11);
    let q = open_driver(&img, true);
    let ranges = [
        (2 * cs, 2 * cs),
        (10 * cs, cs),
        (20 * cs, 3 * cs),
        (24 * cs, cs),
        (40 * cs, 4096),
    ];
    let runs = q.prepare_write_many(&ranges).unwrap();
    // The allocated cluster is written in place; the new space of all the
    // ranges is one extent, in the order of the ranges.
    let fresh: Vec<_> = runs.iter().filter(|r| r.fresh).collect();
    assert!(runs
        .iter()
        .any(|r| !r.fresh && r.guest == 10 * cs && r.len == cs));
    for w in fresh.windows(2) {
        assert_eq!(
            w[1].host,
            w[0].host + w[0].len.div_ceil(cs) * cs,
            "{runs:?}"
        );
    }
    let covered: u64 = runs.iter().map(|r| r.len).sum();
    assert_eq!(covered, ranges.iter().map(|r| r.1).sum::<u64>());
    for (i, r) in runs.iter().enumerate() {
        let data = vec![0x40 + i as u8; r.len as usize];
        q.storage().write_at(&data, r.host).unwrap();
        expect[r.guest as usize..(r.guest + r.len) as usize].copy_from_slice(&data);
    }
    q.commit_write(&runs).unwrap();
    Driver::flush(&q).unwrap();
    drop(q);
    assert_check_clean(&img);
    assert!(qemu_raw(&img, dir.path()) == expect);
}
