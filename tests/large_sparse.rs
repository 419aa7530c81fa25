//! Performance sanity as a functional test: 1 TiB sparse images (qcow2 and
//! QED, alone and as an overlay over a 1 TiB backing) map exactly like
//! `qemu-img map`. The time is printed, never asserted (machines differ).

mod common;

use std::time::Instant;

use common::{catch, Failures, Scratch};

const TIB: u64 = 1 << 40;

fn scattered_writes() -> Vec<String> {
    vec![
        "write -P 1 0 64k".into(),
        "write -P 2 1M 4k".into(),
        format!("write -P 3 {} 128k", TIB / 2),
        format!("write -z {} 64k", TIB / 2 + (1 << 20)),
        format!("write -P 4 {} 64k", 700u64 << 30),
        format!("write -P 5 {} 64k", TIB - 65536),
    ]
}

fn check(s: &Scratch, file: &str) -> Result<(), String> {
    let t = Instant::now();
    let ours = s.our_map_json(file);
    let ours_time = t.elapsed();
    let t = Instant::now();
    let want = s.qemu_map_json(file);
    let qemu_time = t.elapsed();
    println!(
        "{file}: imgpull map (library, debug build) {ours_time:?}, qemu-img map {qemu_time:?}"
    );
    match ours {
        Ok(m) if m == want => {}
        Ok(m) => {
            return Err(format!(
                "map of {file} differs:\n{}{}",
                common::diff_text(&want, &m),
                s.reproducer()
            ))
        }
        Err(e) => return Err(format!("map of {file} failed: {e}\n{}", s.reproducer())),
    }
    let t = Instant::now();
    let cli = s.imgpull(&["map", "--output", "json", file]);
    println!("{file}: imgpull map CLI {:?}", t.elapsed());
    if !cli.ok() || cli.stdout != want {
        return Err(format!(
            "imgpull map --output json {file} differs:\n{}\n{}",
            cli.describe(),
            s.reproducer()
        ));
    }
    Ok(())
}

#[test]
fn one_tib_sparse_images_map_like_qemu() {
    let mut f = Failures::new();
    for (fmt, opts) in [
        ("qcow2", "cluster_size=64k"),
        ("qcow2", "cluster_size=64k,extended_l2=on"),
        ("qcow2", "cluster_size=2M"),
        ("qed", "cluster_size=64k"),
    ] {
        f.check(
            &format!("{fmt} [{opts}] 1 TiB"),
            catch(move || {
                let s = Scratch::new();
                let name = format!("big.{fmt}");
                s.qemu_img(&["create", "-q", "-f", fmt, "-o", opts, &name, "1T"]);
                s.qemu_io(fmt, &name, &scattered_writes());
                check(&s, &name)
            }),
        );
    }
    f.check(
        "qcow2 over qed, 1 TiB each",
        catch(|| {
            let s = Scratch::new();
            s.qemu_img(&["create", "-q", "-f", "qed", "base.qed", "1T"]);
            s.qemu_io("qed", "base.qed", &scattered_writes());
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qed",
                "-F",
                "qed",
                "top.qcow2",
            ]);
            s.qemu_io(
                "qcow2",
                "top.qcow2",
                &[
                    format!("write -P 9 {} 64k", TIB / 4),
                    format!("write -z {} 128k", TIB / 2),
                ],
            );
            check(&s, "top.qcow2")
        }),
    );
    f.finish();
}
