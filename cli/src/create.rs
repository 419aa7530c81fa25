//! `imgpull create`: new images and overlays with qemu-img's defaults.

use std::path::Path;

use imgpull_chain::{resolve_backing, ChainOptions};
use imgpull_image::{BackingFile, CreateOptions, Error, Format, Image, Result};

/// What `imgpull create` was asked for.
pub struct Request<'a> {
    /// Image to create.
    pub path: &'a Path,
    /// Format of the new image.
    pub format: Format,
    /// Backing file name to record.
    pub backing: Option<&'a str>,
    /// Backing format to record.
    pub backing_format: Option<Format>,
    /// `-u`: do not open the backing file.
    pub unsafe_backing: bool,
    /// `-o key=value,...` options.
    pub options: Vec<(String, String)>,
    /// Virtual size; defaults to the backing file's.
    pub size: Option<u64>,
    /// `-q`.
    pub quiet: bool,
}

/// Split qemu-img's `-o a=b,c=d` list (`,,` escapes a comma).
pub fn parse_options(list: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for arg in list {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = arg.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for it in items.into_iter().filter(|s| !s.is_empty()) {
            match it.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => return Err(format!("invalid option '{it}': expected key=value")),
            }
        }
    }
    Ok(out)
}

/// Run `imgpull create`.
pub fn run(req: Request<'_>) -> Result<()> {
    let mut options = req.options;
    // backing_file / backing_fmt may also come as -o options, as in qemu-img.
    let mut backing = req.backing.map(str::to_string);
    let mut backing_format = req.backing_format.map(|f| f.name().to_string());
    options.retain(|(k, v)| match k.as_str() {
        "backing_file" => {
            backing = Some(v.clone());
            false
        }
        "backing_fmt" => {
            backing_format = Some(v.clone());
            false
        }
        _ => true,
    });
    let mut size = req.size;
    if let Some(name) = &backing {
        let Some(fmt) = backing_format.as_deref() else {
            return Err(
                Error::invalid_argument("Backing file specified without backing format")
                    .with_path(req.path),
            );
        };
        let fmt = Format::from_name(fmt).ok_or_else(|| {
            Error::unsupported(format!("backing format '{fmt}' is not supported"))
                .with_path(req.path)
        })?;
        if !req.unsafe_backing {
            let bpath = resolve_backing(req.path, name)?;
            let chain = imgpull_chain::Chain::open(
                &bpath,
                &ChainOptions {
                    format: Some(fmt),
                    ..Default::default()
                },
            )
            .map_err(|e| {
                Error::new(e.kind(), format!("could not open backing image: {e}"))
                    .with_path(req.path)
            })?;
            size.get_or_insert(chain.virtual_size());
        }
    }
    let Some(size) = size else {
        return Err(Error::invalid_argument("image size must be given").with_path(req.path));
    };
    let size = size.div_ceil(512) * 512;
    if !req.quiet {
        let mut line = format!(
            "Formatting '{}', fmt={} size={size}",
            req.path.display(),
            req.format.name()
        );
        if let Some(b) = &backing {
            line += &format!(" backing_file={b}");
        }
        if let Some(f) = &backing_format {
            line += &format!(" backing_fmt={f}");
        }
        for (k, v) in &options {
            line += &format!(" {k}={v}");
        }
        println!("{line}");
    }
    Image::create(
        req.path,
        &CreateOptions {
            format: req.format,
            size,
            backing: backing.map(|name| BackingFile {
                name,
                format: backing_format,
            }),
            options,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::parse_options;

    #[test]
    fn option_lists() {
        let o = parse_options(&["cluster_size=4k,compat=0.10".into(), "a=b,,c".into()]).unwrap();
        assert_eq!(
            o,
            vec![
                ("cluster_size".into(), "4k".into()),
                ("compat".into(), "0.10".into()),
                ("a".into(), "b,c".into())
            ]
        );
        assert!(parse_options(&["novalue".into()]).is_err());
    }
}
