//! `imgpull info`: what `qemu-img info` shows, with its key names.

use std::path::Path;

use imgpull_chain::{resolve_backing, Chain, ChainOptions};
use imgpull_image::{Error, Format, Image, InfoValue, OpenOptions, Result};
use serde_json::{json, Map, Value};

use crate::size::size_to_str;

/// The file's length (in whole sectors, as QEMU's file node reports it)
/// and the bytes the file system allocated for it.
fn file_sizes(img: &Image) -> Result<(u64, u64)> {
    let storage = img.storage();
    let io = |e| Error::io("reading file size", e).with_path(img.path());
    let len = storage.len().map_err(io)?.div_ceil(512) * 512;
    Ok((len, storage.allocated_bytes().map_err(io)?))
}

/// qemu-img's `full-backing-filename`: the recorded name resolved against
/// the image's directory (the name itself if it cannot be resolved).
fn full_backing_name(img: &Image, name: &str) -> String {
    resolve_backing(img.path(), name)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| name.to_string())
}

/// One image's info as a JSON object with qemu-img's keys.
pub fn info_json(img: &Image) -> Result<Value> {
    let info = img.info();
    let (file_len, actual) = file_sizes(img)?;
    let filename = img.path().display().to_string();
    let mut m = Map::new();
    m.insert(
        "children".into(),
        json!([{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": file_len,
                "filename": filename,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }]),
    );
    if let Some(fmt) = info.backing.as_ref().and_then(|b| b.format.clone()) {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(filename));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(info.format.name()));
    m.insert("actual-size".into(), json!(actual));
    if !info.format_specific.is_empty() {
        let data: Map<String, Value> = info
            .format_specific
            .iter()
            .map(|(k, v)| (k.clone(), info_value(v)))
            .collect();
        m.insert(
            "format-specific".into(),
            json!({"type": info.format.name(), "data": data}),
        );
    }
    if let Some(b) = &info.backing {
        let full = full_backing_name(img, &b.name);
        m.insert("full-backing-filename".into(), json!(full));
        m.insert("backing-filename".into(), json!(b.name));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Ok(Value::Object(m))
}

fn info_value(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(i) => json!(i),
        InfoValue::Str(s) => json!(s),
    }
}

fn info_value_text(v: &InfoValue) -> String {
    match v {
        InfoValue::Bool(b) => b.to_string(),
        InfoValue::Int(i) => i.to_string(),
        InfoValue::Str(s) => s.clone(),
    }
}

/// One image's info in qemu-img's human form.
pub fn info_human(img: &Image) -> Result<String> {
    let info = img.info();
    let (file_len, actual) = file_sizes(img)?;
    let name = img.path().display().to_string();
    let mut s = String::new();
    s += &format!("image: {name}\n");
    s += &format!("file format: {}\n", info.format.name());
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(info.virtual_size),
        info.virtual_size
    );
    s += &format!("disk size: {}\n", size_to_str(actual));
    if let Some(cs) = info.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &info.backing {
        let full = full_backing_name(img, &b.name);
        if full == b.name {
            s += &format!("backing file: {}\n", b.name);
        } else {
            s += &format!("backing file: {} (actual path: {full})\n", b.name);
        }
        if let Some(f) = &b.format {
            s += &format!("backing file format: {f}\n");
        }
    }
    if info.dirty {
        s += "dirty flag: true\n";
    }
    if !info.format_specific.is_empty() {
        s += "Format specific information:\n";
        for (k, v) in &info.format_specific {
            s += &format!("    {}: {}\n", k.replace('-', " "), info_value_text(v));
        }
    }
    s += "Child node '/file':\n";
    s += &format!("    filename: {name}\n");
    s += "    protocol type: file\n";
    s += &format!(
        "    file length: {} ({file_len} bytes)\n",
        size_to_str(file_len)
    );
    s += &format!("    disk size: {}\n", size_to_str(actual));
    s += &format!("    I/O backend: {}\n", img.storage().backend_name());
    Ok(s)
}

/// Run `imgpull info`.
pub fn run(
    path: &Path,
    format: Option<Format>,
    json: bool,
    backing_chain: bool,
    force_share: bool,
) -> Result<()> {
    let images: Vec<std::sync::Arc<Image>> = if backing_chain {
        let chain = Chain::open(
            path,
            &ChainOptions {
                format,
                writable: false,
                force_share,
            },
        )?;
        chain.layers().iter().cloned().collect()
    } else {
        vec![std::sync::Arc::new(Image::open(
            path,
            &OpenOptions {
                writable: false,
                format,
                force_share,
            },
        )?)]
    };
    if json {
        let values = images
            .iter()
            .map(|i| info_json(i))
            .collect::<Result<Vec<_>>>()?;
        let v = if backing_chain {
            Value::Array(values)
        } else {
            values.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", pretty(&v));
    } else {
        let texts = images
            .iter()
            .map(|i| info_human(i))
            .collect::<Result<Vec<_>>>()?;
        print!("{}", texts.join("\n"));
    }
    Ok(())
}

/// Pretty JSON with qemu-img's four-space indent.
fn pretty(v: &Value) -> String {
    use serde::Serialize as _;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .expect("serialising a JSON value cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}
