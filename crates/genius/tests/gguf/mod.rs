//! Writes variants of a GGUF model for the tests: split into parts the way
//! llama.cpp's `gguf-split` does, or with a metadata entry added.
//!
//! A split model is a set of GGUF files, each holding some of the tensors.
//! The first keeps all the metadata and adds `split.no`, `split.count` and
//! `split.tensors.count`; the others carry only those three keys.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
const GGUF_U16: u32 = 2;
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;

struct Tensor {
    /// Name, dimensions and type: the tensor-info bytes before the offset.
    head: Vec<u8>,
    /// Where its data starts, from the start of the data section.
    offset: u64,
}

/// A GGUF file's layout: its metadata as raw bytes, and where each
/// tensor's data lies.
struct Layout {
    file: File,
    len: u64,
    n_kv: u64,
    kv: Vec<u8>,
    alignment: u64,
    /// Sorted by offset.
    tensors: Vec<Tensor>,
    data_start: u64,
}

impl Layout {
    fn read(source: &Path) -> io::Result<Self> {
        let mut file = File::open(source)?;
        let len = file.metadata()?.len();
        let mut r = io::BufReader::new(&mut file);
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(io::Error::other("not a GGUF file"));
        }
        let version = read_u32(&mut r)?;
        if version != 3 {
            return Err(io::Error::other(format!("GGUF version {version}")));
        }
        let n_tensors = read_u64(&mut r)?;
        let n_kv = read_u64(&mut r)?;
        // The metadata is copied byte for byte; it is walked only to find
        // its end and the alignment.
        let mut kv = Vec::new();
        let mut alignment = 32u64;
        for _ in 0..n_kv {
            let key = read_string(&mut r, &mut kv)?;
            let kind = read_u32(&mut r)?;
            kv.extend_from_slice(&kind.to_le_bytes());
            let start = kv.len();
            copy_value(&mut r, kind, &mut kv)?;
            if key == "general.alignment" && kind == GGUF_U32 {
                alignment = u32::from_le_bytes(kv[start..start + 4].try_into().unwrap()) as u64;
            }
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let mut head = Vec::new();
            read_string(&mut r, &mut head)?;
            let dims = read_u32(&mut r)?;
            head.extend_from_slice(&dims.to_le_bytes());
            for _ in 0..dims {
                head.extend_from_slice(&read_u64(&mut r)?.to_le_bytes());
            }
            head.extend_from_slice(&read_u32(&mut r)?.to_le_bytes());
            let offset = read_u64(&mut r)?;
            tensors.push(Tensor { head, offset });
        }
        let data_start = align(r.stream_position()?, alignment);
        drop(r);
        tensors.sort_by_key(|t| t.offset);
        Ok(Self {
            file,
            len,
            n_kv,
            kv,
            alignment,
            tensors,
            data_start,
        })
    }

    /// Writes a GGUF file with metadata `kv` (`n_kv` entries) and the
    /// tensors `range`, data included.
    fn write(
        &mut self,
        path: &Path,
        n_kv: u64,
        kv: &[u8],
        range: std::ops::Range<usize>,
    ) -> io::Result<()> {
        let chunk = &self.tensors[range.clone()];
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(b"GGUF")?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(chunk.len() as u64).to_le_bytes())?;
        out.write_all(&n_kv.to_le_bytes())?;
        out.write_all(kv)?;
        // Each tensor keeps its padded slot, so the new offsets stay aligned.
        let base = chunk[0].offset;
        let mut written = 24 + kv.len() as u64;
        for tensor in chunk {
            out.write_all(&tensor.head)?;
            out.write_all(&(tensor.offset - base).to_le_bytes())?;
            written += tensor.head.len() as u64 + 8;
        }
        let padding = align(written, self.alignment) - written;
        out.write_all(&vec![0u8; padding as usize])?;
        let end = self
            .tensors
            .get(range.end)
            .map_or(self.len, |next| self.data_start + next.offset);
        self.file.seek(SeekFrom::Start(self.data_start + base))?;
        let wanted = end - self.data_start - base;
        let copied = io::copy(&mut (&mut self.file).take(wanted), &mut out)?;
        assert_eq!(copied, wanted, "the source ended early");
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    }
}

/// Writes `parts` files `{prefix}-0000N-of-0000M.gguf` into `dir`, each with
/// an even share of `source`'s tensors. Returns their paths, first first.
pub(crate) fn split(
    source: &Path,
    dir: &Path,
    prefix: &str,
    parts: usize,
) -> io::Result<Vec<PathBuf>> {
    let mut layout = Layout::read(source)?;
    let n_tensors = layout.tensors.len();
    let per_part = n_tensors.div_ceil(parts);
    assert!(per_part * (parts - 1) < n_tensors, "too few tensors");
    let mut paths = Vec::new();
    for no in 0..parts {
        let path = dir.join(format!("{prefix}-{:05}-of-{parts:05}.gguf", no + 1));
        let mut kv = if no == 0 {
            layout.kv.clone()
        } else {
            Vec::new()
        };
        put_key(&mut kv, "split.no", GGUF_U16, &(no as u16).to_le_bytes());
        put_key(
            &mut kv,
            "split.count",
            GGUF_U16,
            &(parts as u16).to_le_bytes(),
        );
        put_key(
            &mut kv,
            "split.tensors.count",
            GGUF_I32,
            &(n_tensors as i32).to_le_bytes(),
        );
        let n_kv = if no == 0 { layout.n_kv + 3 } else { 3 };
        let range = no * per_part..((no + 1) * per_part).min(n_tensors);
        layout.write(&path, n_kv, &kv, range)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Copies `source` to `dest` with a string entry `key` added to its
/// metadata.
pub(crate) fn with_string(source: &Path, dest: &Path, key: &str, value: &str) -> io::Result<()> {
    let mut layout = Layout::read(source)?;
    let mut kv = layout.kv.clone();
    let mut encoded = (value.len() as u64).to_le_bytes().to_vec();
    encoded.extend_from_slice(value.as_bytes());
    put_key(&mut kv, key, GGUF_STRING, &encoded);
    let n_kv = layout.n_kv + 1;
    let all = 0..layout.tensors.len();
    layout.write(dest, n_kv, &kv, all)
}

fn align(at: u64, alignment: u64) -> u64 {
    at.div_ceil(alignment) * alignment
}

fn put_key(out: &mut Vec<u8>, key: &str, kind: u32, value: &[u8]) {
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(value);
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a GGUF string, copying its encoded bytes to `out`.
fn read_string(r: &mut impl Read, out: &mut Vec<u8>) -> io::Result<String> {
    let n = read_u64(r)?;
    let mut bytes = vec![0u8; n as usize];
    r.read_exact(&mut bytes)?;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&bytes);
    String::from_utf8(bytes).map_err(io::Error::other)
}

/// Copies one value of type `kind` to `out`.
fn copy_value(r: &mut impl Read, kind: u32, out: &mut Vec<u8>) -> io::Result<()> {
    let fixed = match kind {
        0 | 1 | 7 => 1, // u8, i8, bool
        2 | 3 => 2,     // u16, i16
        4..=6 => 4,     // u32, i32, f32
        10..=12 => 8,   // u64, i64, f64
        GGUF_STRING => return read_string(r, out).map(drop),
        GGUF_ARRAY => {
            let inner = read_u32(r)?;
            let n = read_u64(r)?;
            out.extend_from_slice(&inner.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            for _ in 0..n {
                copy_value(r, inner, out)?;
            }
            return Ok(());
        }
        other => return Err(io::Error::other(format!("unknown GGUF type {other}"))),
    };
    let mut b = vec![0u8; fixed];
    r.read_exact(&mut b)?;
    out.extend_from_slice(&b);
    Ok(())
}
