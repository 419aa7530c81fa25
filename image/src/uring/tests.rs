//! Behaviour tests run against every backend: [`SyncFile`], [`PreadFile`],
//! [`UringFile`] buffered, with O_DIRECT, and with an imposed alignment
//! (the bounce and read-modify-write paths on any file system), on the
//! default temporary directory (ext4 here) and on tmpfs (`/dev/shm`).
//! File contents are checked with `std::fs::read`, not with our own reads.

use super::*;
use crate::storage::Allocation;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Make = fn(File) -> Box<dyn Storage>;

fn make_sync(f: File) -> Box<dyn Storage> {
    Box::new(SyncFile::new(f))
}
fn make_pread(f: File) -> Box<dyn Storage> {
    Box::new(PreadFile::new(f))
}
fn make_uring(f: File) -> Box<dyn Storage> {
    Box::new(UringFile::new(f).expect("io_uring works on the test machines"))
}
fn make_uring_direct(f: File) -> Box<dyn Storage> {
    Box::new(UringFile::with_direct(f, true).expect("io_uring works on the test machines"))
}
fn make_uring_4k(f: File) -> Box<dyn Storage> {
    Box::new(UringFile::with_alignment(
        f,
        Align {
            mem: 4096,
            offset: 4096,
        },
    ))
}
fn make_uring_512(f: File) -> Box<dyn Storage> {
    Box::new(UringFile::with_alignment(
        f,
        Align {
            mem: 8,
            offset: 512,
        },
    ))
}

const BACKENDS: &[(&str, Make)] = &[
    ("sync", make_sync),
    ("pread", make_pread),
    ("uring", make_uring),
    ("uring+O_DIRECT", make_uring_direct),
    ("uring+align4k", make_uring_4k),
    ("uring+align512", make_uring_512),
];

fn dirs() -> Vec<PathBuf> {
    let mut d = vec![std::env::temp_dir()];
    if Path::new("/dev/shm").is_dir() {
        d.push("/dev/shm".into());
    }
    d
}

/// A fresh read-write file in `dir`, removed when the guard drops.
fn temp_in(dir: &Path) -> (tempfile::TempPath, File) {
    let t = tempfile::Builder::new()
        .prefix("imgpull-uring-")
        .tempfile_in(dir)
        .unwrap();
    let f = t.as_file().try_clone().unwrap();
    (t.into_temp_path(), f)
}

/// Run `check` for every backend in every directory.
fn each(check: impl Fn(&str, &Path, &dyn Storage)) {
    for dir in dirs() {
        for (name, make) in BACKENDS {
            let (path, f) = temp_in(&dir);
            let s = make(f);
            check(&format!("{name} in {}", dir.display()), &path, &*s);
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn reads_past_eof_are_zero_and_length_is_exact() {
    each(|what, path, s| {
        s.write_at(b"abc", 0).unwrap();
        let mut buf = [0xffu8; 8];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0\0\0", "{what}");
        let mut far = [0xffu8; 5000];
        s.read_at(&mut far, 1 << 20).unwrap();
        assert!(far.iter().all(|&b| b == 0), "{what}");
        assert_eq!(s.len().unwrap(), 3, "{what}");
        // An unaligned write past the end leaves a zero gap and exact length.
        s.write_at(b"xyz", 5000).unwrap();
        assert_eq!(s.len().unwrap(), 5003, "{what}");
        let disk = std::fs::read(path).unwrap();
        assert_eq!(&disk[..3], b"abc", "{what}");
        assert!(disk[3..5000].iter().all(|&b| b == 0), "{what}");
        assert_eq!(&disk[5000..], b"xyz", "{what}");
        let mut tail = vec![0xffu8; 4096];
        s.read_at(&mut tail, 4098).unwrap();
        assert_eq!(&tail[902..905], b"xyz", "{what}");
        assert!(tail[905..].iter().all(|&b| b == 0), "{what}");
        // Zero-length requests are no-ops.
        s.write_at(&[], 1 << 30).unwrap();
        s.read_at(&mut [], 1 << 30).unwrap();
        assert_eq!(s.len().unwrap(), 5003, "{what}");
        s.flush().unwrap();
    });
}

#[test]
fn holes_and_data() {
    each(|what, _, s| {
        s.set_len(1 << 20).unwrap();
        s.write_at(&[1u8; 4096], 512 * 1024).unwrap();
        let (a, n) = s.allocation(0, 1 << 20).unwrap();
        // Some file systems report everything as data; accept both.
        if a == Allocation::Hole {
            assert_eq!(n, 512 * 1024, "{what}");
            let (a2, _) = s.allocation(512 * 1024, 4096).unwrap();
            assert_eq!(a2, Allocation::Data, "{what}");
        }
        let (a3, _) = s.allocation(2 << 20, 10).unwrap();
        assert_eq!(a3, Allocation::Hole, "{what}");
        let used = s.allocated_bytes().unwrap();
        assert!((4096..1 << 20).contains(&used), "{what}: {used}");
        s.set_len(100).unwrap();
        assert_eq!(s.len().unwrap(), 100, "{what}");
    });
}

#[test]
fn batches_larger_than_the_ring() {
    each(|what, path, s| {
        // Unaligned 1000-byte pieces and aligned 4 KiB ones, more than
        // three rings' worth, written in one batch and read in one batch.
        let n = RING_ENTRIES as usize * 3 + 7;
        let mut layout = Vec::new();
        let mut off = 0u64;
        for i in 0..n {
            let len = if i % 2 == 0 { 1000 } else { 4096 };
            layout.push((off, pattern(i as u64, len)));
            off += len as u64;
        }
        let mut reqs: Vec<IoReq> = layout
            .iter()
            .map(|(o, d)| IoReq::Write { offset: *o, buf: d })
            .collect();
        s.submit(&mut reqs).unwrap();
        drop(reqs);
        let disk = std::fs::read(path).unwrap();
        assert_eq!(disk.len() as u64, off, "{what}");
        for (o, d) in &layout {
            assert_eq!(
                &disk[*o as usize..*o as usize + d.len()],
                &d[..],
                "{what} @{o}"
            );
        }
        let mut back: Vec<Vec<u8>> = layout.iter().map(|(_, d)| vec![0xee; d.len()]).collect();
        back.push(vec![0xee; 3000]); // crosses the end of the file
        let mut reqs: Vec<IoReq> = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| IoReq::Read {
                offset: layout.get(i).map_or(off - 1000, |l| l.0),
                buf: b,
            })
            .collect();
        s.submit(&mut reqs).unwrap();
        drop(reqs);
        for (i, (_, d)) in layout.iter().enumerate() {
            assert_eq!(&back[i], d, "{what} request {i}");
        }
        let last = back.last().unwrap();
        assert_eq!(&last[..1000], &disk[disk.len() - 1000..], "{what}");
        assert!(last[1000..].iter().all(|&b| b == 0), "{what}");
    });
}

#[test]
fn concurrent_threads_with_interleaved_ranges() {
    // Four threads write interleaved 1000-byte pieces (neighbours share
    // 512-byte and 4 KiB blocks, so the read-modify-write paths race if
    // they are not serialised), in batches, then read them back.
    const THREADS: u64 = 4;
    const PIECES: u64 = 2000;
    const PIECE: usize = 1000;
    for dir in dirs() {
        for (name, make) in BACKENDS {
            let what = format!("{name} in {}", dir.display());
            let (path, f) = temp_in(&dir);
            let s: Arc<dyn Storage> = Arc::from(make(f));
            let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let s = Arc::clone(&s);
                    let start = Arc::clone(&start);
                    std::thread::spawn(move || {
                        let mine: Vec<(u64, Vec<u8>)> = (0..PIECES)
                            .filter(|i| i % THREADS == t)
                            .map(|i| (i * PIECE as u64, pattern(i + 1000, PIECE)))
                            .collect();
                        start.wait();
                        for chunk in mine.chunks(5) {
                            let mut reqs: Vec<IoReq> = chunk
                                .iter()
                                .map(|(o, d)| IoReq::Write { offset: *o, buf: d })
                                .collect();
                            s.submit(&mut reqs).unwrap();
                        }
                        for (o, d) in &mine {
                            let mut b = vec![0u8; PIECE];
                            s.read_at(&mut b, *o).unwrap();
                            assert_eq!(&b, d, "piece at {o}");
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .unwrap_or_else(|_| panic!("{what}: a thread failed"));
            }
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(disk.len(), PIECES as usize * PIECE, "{what}");
            for i in 0..PIECES {
                let o = i as usize * PIECE;
                assert_eq!(
                    &disk[o..o + PIECE],
                    &pattern(i + 1000, PIECE)[..],
                    "{what} piece {i}"
                );
            }
        }
    }
}

#[test]
fn writes_to_a_read_only_descriptor_are_io_errors() {
    for dir in dirs() {
        for (name, make) in BACKENDS {
            let (path, f) = temp_in(&dir);
            drop(f);
            std::fs::write(&path, b"0123456789").unwrap();
            let ro = File::open(&path).unwrap();
            let s = make(ro);
            let e = s.write_at(b"x", 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{name}: {e}");
            let mut reqs = [
                IoReq::Write {
                    offset: 4096,
                    buf: &[1u8; 4096],
                },
                IoReq::Write {
                    offset: 3,
                    buf: b"abc",
                },
            ];
            assert!(s.submit(&mut reqs).is_err(), "{name}");
            let mut b = [0u8; 4];
            s.read_at(&mut b, 2).unwrap();
            assert_eq!(&b, b"2345", "{name}");
            assert_eq!(std::fs::read(&path).unwrap(), b"0123456789", "{name}");
        }
    }
}

#[test]
fn uring_moves_the_bytes_through_io_uring() {
    let (_path, f) = temp_in(&std::env::temp_dir());
    let s = UringFile::new(f).unwrap();
    let data = pattern(7, 256 * 1024);
    let before = io_counters();
    s.write_at(&data, 0).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    let d = io_counters().since(&before);
    assert!(d.uring_written >= data.len() as u64, "{d:?}");
    assert!(d.uring_read >= data.len() as u64, "{d:?}");

    let (_path, f) = temp_in(&std::env::temp_dir());
    let p = PreadFile::new(f);
    let before = io_counters();
    p.write_at(&data, 0).unwrap();
    let d = io_counters().since(&before);
    assert!(d.pread_written >= data.len() as u64, "{d:?}");
}

#[test]
fn metadata_goes_through_pread_and_is_counted_apart() {
    for dir in dirs() {
        for (name, make) in BACKENDS {
            let what = format!("{name} in {}", dir.display());
            let (path, f) = temp_in(&dir);
            let s = make(f);
            let before = io_counters();
            s.write_meta(b"table", 3).unwrap();
            let mut back = [0u8; 8];
            s.read_meta(&mut back, 0).unwrap();
            assert_eq!(&back, b"\0\0\0table", "{what}");
            assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0table", "{what}");
            let d = io_counters().since(&before);
            if *name == "uring" || *name == "pread" {
                // Concurrent tests may add data bytes; ours are metadata.
                assert!(d.meta_written >= 5 && d.meta_read >= 8, "{what}: {d:?}");
            }
        }
    }
}

#[test]
fn o_direct_is_used_where_supported() {
    // tmpfs takes O_DIRECT with any alignment.
    if Path::new("/dev/shm").is_dir() {
        let (_p, f) = temp_in(Path::new("/dev/shm"));
        let s = UringFile::with_direct(f, true).unwrap();
        if s.is_direct() {
            assert_eq!(s.direct_alignment(), Some((1, 1)));
        }
    }
    // Elsewhere the alignment comes from statx; an unaligned write must
    // still succeed through the bounce path.
    let (path, f) = temp_in(&std::env::temp_dir());
    let supported = direct::alignment(&f).is_some();
    let s = UringFile::with_direct(f, true).unwrap();
    assert_eq!(s.is_direct(), supported);
    if let Some((mem, off)) = s.direct_alignment() {
        assert!(mem.is_power_of_two() && off.is_power_of_two());
        assert!(direct::is_direct(s.file()).unwrap());
    }
    s.write_at(b"hello", 7).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"\0\0\0\0\0\0\0hello");
}

#[test]
fn submit_many_spans_backends() {
    let shm = dirs().pop().unwrap();
    let files: Vec<(tempfile::TempPath, Box<dyn Storage>)> = BACKENDS
        .iter()
        .map(|(_, make)| {
            let (p, f) = temp_in(&shm);
            (p, make(f))
        })
        .collect();
    for (i, (p, _)) in files.iter().enumerate() {
        std::fs::write(p, pattern(i as u64, 10_000)).unwrap();
    }
    let mut bufs: Vec<Vec<u8>> = vec![vec![0xaa; 3000]; files.len() * 2];
    let mut reqs: Vec<(&dyn Storage, IoReq)> = Vec::new();
    for (k, b) in bufs.iter_mut().enumerate() {
        let s = &*files[k % files.len()].1;
        let offset = if k < files.len() { 100 } else { 9_000 };
        reqs.push((s, IoReq::Read { offset, buf: b }));
    }
    let before = io_counters();
    submit_many(&mut reqs).unwrap();
    drop(reqs);
    assert!(io_counters().since(&before).uring_read > 0);
    for (k, b) in bufs.iter().enumerate() {
        let want = pattern((k % files.len()) as u64, 10_000);
        if k < files.len() {
            assert_eq!(&b[..], &want[100..3100], "request {k}");
        } else {
            assert_eq!(&b[..1000], &want[9000..], "request {k}");
            assert!(b[1000..].iter().all(|&x| x == 0), "request {k}");
        }
    }
    // Writes through several storages at once, then an error surfaces.
    let data = pattern(99, 4096);
    let mut reqs: Vec<(&dyn Storage, IoReq)> = files
        .iter()
        .map(|(_, s)| {
            (
                &**s,
                IoReq::Write {
                    offset: 20_000,
                    buf: &data[..],
                },
            )
        })
        .collect();
    submit_many(&mut reqs).unwrap();
    drop(reqs);
    for (p, _) in &files {
        assert_eq!(&std::fs::read(p).unwrap()[20_000..], &data[..]);
    }
}

#[test]
fn backend_selection() {
    assert_eq!(Backend::parse("uring"), Some(Backend::Uring));
    assert_eq!(Backend::parse(" PREAD "), Some(Backend::Pread));
    assert_eq!(Backend::parse(""), Some(Backend::Auto));
    assert_eq!(Backend::parse("aio"), None);
    let o = StorageOptions::from_values(Some("io_uring"), Some("1")).unwrap();
    assert_eq!((o.backend, o.direct), (Backend::Uring, true));
    assert_eq!(
        StorageOptions::from_values(None, None).unwrap(),
        StorageOptions::default()
    );
    let e = StorageOptions::from_values(Some("fast"), None).unwrap_err();
    assert!(e.to_string().contains("IMGPULL_IO_BACKEND"), "{e}");
    assert!(StorageOptions::from_values(None, Some("maybe")).is_err());

    let no = || Err("seccomp says no".to_string());
    let e = resolve(Backend::Uring, no()).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
    assert!(e.to_string().contains("seccomp says no"), "{e}");
    assert_eq!(resolve(Backend::Auto, no()).unwrap().0, Backend::Pread);
    assert_eq!(resolve(Backend::Auto, Ok(())).unwrap().0, Backend::Uring);
    assert_eq!(resolve(Backend::Pread, Ok(())).unwrap().0, Backend::Pread);

    // This machine has io_uring: both backends open by name.
    uring_available().unwrap();
    for (backend, name) in [(Backend::Uring, URING_NAME), (Backend::Pread, PREAD_NAME)] {
        let (_p, f) = temp_in(&std::env::temp_dir());
        let s = open(
            f,
            &StorageOptions {
                backend,
                direct: false,
            },
        )
        .unwrap();
        assert_eq!(s.backend_name(), name);
    }
}

#[test]
fn fixed_pool_buffers_go_through_registered_buffers() {
    for dir in dirs() {
        for (name, make) in [
            ("uring", make_uring as Make),
            ("uring+O_DIRECT", make_uring_direct),
        ] {
            let what = format!("{name} in {}", dir.display());
            let (path, f) = temp_in(&dir);
            let s = make(f);
            // Two pools one after the other (the second may reuse the first's
            // slot: the ring must re-register it), used from two threads.
            for round in 0..2u64 {
                let pool = FixedPool::new(8, 64 * 1024).unwrap();
                let before = io_counters();
                std::thread::scope(|sc| {
                    for t in 0..2u64 {
                        let (s, pool) = (&*s, &pool);
                        sc.spawn(move || {
                            let mut bufs: Vec<FixedBuf> = (0..3).map(|_| pool.get()).collect();
                            for (i, b) in bufs.iter_mut().enumerate() {
                                let p = pattern(round * 100 + t * 10 + i as u64, b.len());
                                b.copy_from_slice(&p);
                            }
                            let base = t * 3 * 65536;
                            let mut reqs: Vec<IoReq> = bufs
                                .iter()
                                .enumerate()
                                .map(|(i, b)| IoReq::Write {
                                    offset: base + i as u64 * 65536,
                                    buf: b,
                                })
                                .collect();
                            s.submit(&mut reqs).unwrap();
                            drop(reqs);
                            for b in bufs.iter_mut() {
                                b.fill(0);
                            }
                            // Unaligned sub-slices too (bounced on O_DIRECT files).
                            let mut reqs: Vec<IoReq> = bufs
                                .iter_mut()
                                .enumerate()
                                .map(|(i, b)| IoReq::Read {
                                    offset: base + i as u64 * 65536 + 1,
                                    buf: &mut b[1..],
                                })
                                .collect();
                            s.submit(&mut reqs).unwrap();
                            drop(reqs);
                            for (i, b) in bufs.iter().enumerate() {
                                let want = pattern(round * 100 + t * 10 + i as u64, 65536);
                                assert_eq!(&b[1..], &want[1..], "{t}/{i}");
                            }
                        });
                    }
                });
                let d = io_counters().since(&before);
                // 6 aligned 64 KiB writes at least went through fixed buffers.
                assert!(d.uring_fixed >= 6 * 65536, "{what} round {round}: {d:?}");
            }
            let disk = std::fs::read(&path).unwrap();
            for t in 0..2u64 {
                for i in 0..3u64 {
                    let o = ((t * 3 + i) * 65536) as usize;
                    assert_eq!(
                        &disk[o..o + 65536],
                        &pattern(100 + t * 10 + i, 65536)[..],
                        "{what}"
                    );
                }
            }
        }
    }
}

/// In a child process whose seccomp filter refuses `io_uring_setup` (as
/// container runtimes do): auto falls back to pread, forced uring is a
/// clear error at open.
#[test]
fn without_io_uring_auto_falls_back_and_forced_uring_fails() {
    const CHILD: &str = "IMGPULL_TEST_NO_URING_CHILD";
    let name = "uring::tests::without_io_uring_auto_falls_back_and_forced_uring_fails";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "child ran no test:\n{text}");
        assert!(text.contains("child checks done"), "{text}");
        return;
    }
    deny_io_uring_setup();
    let why = uring_available().unwrap_err();
    assert!(why.contains("cannot create an io_uring"), "{why}");
    let (_p, f) = temp_in(&std::env::temp_dir());
    let s = open(f, &StorageOptions::default()).unwrap();
    assert_eq!(s.backend_name(), PREAD_NAME);
    s.write_at(b"still works", 3).unwrap();
    let (_p, f) = temp_in(&std::env::temp_dir());
    let e = open(
        f,
        &StorageOptions {
            backend: Backend::Uring,
            direct: false,
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
    assert!(e.to_string().contains("IMGPULL_IO_BACKEND=uring"), "{e}");
    let (_p, f) = temp_in(&std::env::temp_dir());
    assert!(UringFile::new(f).is_err());
    println!("child checks done");
}

/// Install a seccomp filter on this thread: `io_uring_setup` fails with
/// ENOSYS, everything else is allowed.
fn deny_io_uring_setup() {
    const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let prog = [
        f(LD_NR, 0, 0, 0), // seccomp_data.nr
        f(JEQ, 0, 1, libc::SYS_io_uring_setup as u32),
        f(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        f(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls with a valid filter program.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &fprog as *const libc::sock_fprog as libc::c_ulong,
            ),
            0,
            "{}",
            io::Error::last_os_error()
        );
    }
}

#[test]
fn copy_through_buffers_or_splices_and_falls_back_elsewhere() {
    const LEN: usize = 3 << 20;
    let contents = [pattern(40, LEN), pattern(41, LEN)];
    for (shm, (dst_name, make_dst)) in dirs()
        .into_iter()
        .flat_map(|d| BACKENDS.iter().map(move |b| (d.clone(), b)))
    {
        for (src_name, make_src) in BACKENDS {
            let what = format!("{src_name} -> {dst_name} in {}", shm.display());
            let srcs: Vec<(tempfile::TempPath, Box<dyn Storage>)> = (0..2)
                .map(|i| {
                    let (p, f) = temp_in(&shm);
                    std::fs::write(&p, &contents[i as usize]).unwrap();
                    (p, make_src(f))
                })
                .collect();
            let (dst_path, f) = temp_in(&shm);
            let dst = make_dst(f);
            // (source, offset, len) lists per request, with destinations
            // packed one after another from 4096.
            let plan: Vec<Vec<(usize, u64, u64)>> = vec![
                // Many small unaligned pieces alternating between the
                // files: more than a chain holds.
                (0..200u64)
                    .map(|k| ((k % 2) as usize, 1000 + k * 7919 % 2_000_000, 100 + k * 13))
                    .collect(),
                // Large page-aligned ranges, more than one pipe.
                vec![(0, 0, 2 << 20), (1, 4096, (1 << 20) + 4096)],
                // A range running past the end of its source, then more.
                vec![(1, LEN as u64 - 5000, 20_000), (0, 77, 5000)],
                // Wholly past the end.
                vec![(0, 10 * LEN as u64, 8192)],
            ];
            let mut reqs = Vec::new();
            let mut expect = vec![0u8; 4096];
            let mut at = 4096u64;
            for segs in &plan {
                let mut r = CopyReq {
                    dst_offset: at,
                    srcs: Vec::new(),
                };
                for &(i, off, len) in segs {
                    r.srcs.push(CopySrc {
                        storage: &*srcs[i].1,
                        offset: off,
                        len,
                    });
                    let w = &contents[i];
                    for b in off..off + len {
                        expect.push(w.get(b as usize).copied().unwrap_or(0));
                    }
                    at += len;
                }
                reqs.push(r);
            }
            for splice in [false, true] {
                let what = format!("{what}, splice {splice}");
                std::fs::write(&dst_path, b"").unwrap();
                let before = io_counters();
                copy::copy_as(&*dst, &reqs, splice).unwrap_or_else(|e| panic!("{what}: {e}"));
                let d = io_counters().since(&before);
                let got = std::fs::read(&dst_path).unwrap();
                assert_eq!(got.len(), expect.len(), "{what}: length");
                assert!(got[4096..] == expect[4096..], "{what}: content");
                // Everything but the ranges that ran off a source's end
                // goes the fast way between plain io_uring files.
                let fast = *src_name == "uring" && *dst_name == "uring";
                if fast && splice && copy::kernel_splices() {
                    assert!(d.uring_spliced >= (3 << 20), "{what}: {d:?}");
                }
                if fast && !splice {
                    assert!(d.uring_fixed >= (6 << 20), "{what}: {d:?}");
                    assert_eq!(d.uring_spliced, 0, "{what}: {d:?}");
                }
                let plain = |n: &str| n == "pread" || n == "sync";
                if plain(dst_name) || plain(src_name) {
                    assert_eq!(d.uring_spliced, 0, "{what}: {d:?}");
                }
            }
        }
    }
}

#[test]
fn copy_reports_which_side_failed() {
    let (p, f) = temp_in(&dirs().pop().unwrap());
    std::fs::write(&p, pattern(1, 10_000)).unwrap();
    let src = UringFile::new(f).unwrap();
    let ro = File::open(&p).unwrap();
    let dst = UringFile::new(ro).unwrap();
    let reqs = [CopyReq {
        dst_offset: 0,
        srcs: vec![CopySrc {
            storage: &src,
            offset: 0,
            len: 8192,
        }],
    }];
    match copy(&dst, &reqs) {
        Err(CopyError::Write(e)) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
        other => panic!("expected a write error, got {other:?}"),
    }
}
