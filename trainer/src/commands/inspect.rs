//! `minisam inspect`: everything a packed file says about itself (header, architecture,
//! provenance, tensor table with checksums), for audits and bug reports. Opening the file
//! validates every range and CRC, so a file that prints is a file that loads.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use minisam_models::format::{self, PackedModel, TensorInfo};

use crate::cli::InspectArgs;

/// The fixed header fields (the reader has already checked them when this is printed).
fn header(path: &Path) -> Result<(u32, u32, u32)> {
    let mut h = [0u8; format::HEADER_LEN];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    Ok((u32_at(8), u32_at(12), u32_at(16)))
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let model = PackedModel::open(&args.file)
        .with_context(|| format!("{} is not a valid packed model (to inspect a checkpoint, pack it first with `minisam pack`)", args.file.display()))?;
    let (version, manifest_len, manifest_crc) = header(&args.file)?;
    let p = model.provenance();
    let mut text = format!("file: {}\n", args.file.display());
    text += &format!("header: magic MSAMPACK, version {version}, manifest {manifest_len} bytes, manifest crc32 {manifest_crc:08x}\n");
    text += &format!("sha256: {}\n", model.file_sha256());
    text += &format!("config: {:#?}\n", model.config());
    text += &format!(
        "provenance: source {} (sha256 {}), packer {}, keep_fp16 {:?}\n",
        p.source_file, p.source_sha256, p.packer_version, p.keep_fp16
    );
    text += &render_tensors(&model.tensors());
    crate::runtime::emit(&text)
}

pub fn render_tensors(tensors: &[TensorInfo]) -> String {
    let mut out = format!(
        "{:<64} {:<20} {:<5} {:>12} {:>8}\n",
        "tensor", "shape", "dtype", "bytes", "crc32"
    );
    let (mut total, mut params) = (0u64, 0u64);
    for t in tensors {
        let shape = format!("{:?}", t.shape);
        out.push_str(&format!(
            "{:<64} {:<20} {:<5} {:>12} {:08x}\n",
            t.name,
            shape,
            format!("{:?}", t.dtype),
            t.bytes,
            t.crc32
        ));
        total += t.bytes;
        params += t.shape.iter().product::<usize>() as u64;
    }
    out.push_str(&format!(
        "total: {} tensors, {params} parameters, {total} bytes ({:.2} MiB)\n",
        tensors.len(),
        total as f64 / 1048576.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use minisam_models::format::Dtype;

    #[test]
    fn table_lists_tensors_and_totals() {
        let t = vec![
            TensorInfo {
                name: "a.weight".into(),
                shape: vec![2, 3],
                dtype: Dtype::Nf4,
                bytes: 10,
                crc32: 0xdead,
            },
            TensorInfo {
                name: "a.bias".into(),
                shape: vec![2],
                dtype: Dtype::F16,
                bytes: 4,
                crc32: 1,
            },
        ];
        let s = render_tensors(&t);
        assert!(
            s.lines().any(|l| l.starts_with("a.weight")
                && l.contains("[2, 3]")
                && l.contains("Nf4")
                && l.ends_with("0000dead")),
            "{s}"
        );
        assert!(
            s.contains("total: 2 tensors, 8 parameters, 14 bytes"),
            "{s}"
        );
    }

    #[test]
    fn a_non_packed_file_is_an_error() {
        let f =
            std::env::temp_dir().join(format!("minisam-test-{}-inspect.msam", std::process::id()));
        std::fs::write(&f, b"MSAMPACK but truncated").unwrap();
        let err = format!("{:#}", run(&InspectArgs { file: f.clone() }).unwrap_err());
        assert!(err.contains("not a valid packed model"), "{err}");
        std::fs::remove_file(&f).unwrap();
    }
}
