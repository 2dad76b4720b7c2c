//! A minimal writer of NumPy `.npy` files (format version 1.0), so that any independent
//! implementation can read the inputs and outputs of a step (`twilight demo --dump`).
//!
//! A file is the magic `\x93NUMPY`, the version bytes `1, 0`, the header length as a
//! little-endian `u16`, then the header: a Python dict literal
//! `{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by
//! `\n` so that the data starts at a multiple of 64 bytes. The data follows in C order,
//! little-endian, with no padding.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// The magic string every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Data starts at a multiple of this many bytes.
pub const ALIGN: usize = 64;

/// An element type this writer knows: its NumPy `descr` and little-endian bytes.
pub trait NpyElement: Copy {
    /// The `descr` of the header, e.g. `<f4`.
    const DESCR: &'static str;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian bytes of `self`.
    fn push_le(self, out: &mut Vec<u8>);
}

impl NpyElement for half::f16 {
    const DESCR: &'static str = "<f2";
    const SIZE: usize = 2;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bits().to_le_bytes());
    }
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for i32 {
    const DESCR: &'static str = "<i4";
    const SIZE: usize = 4;
    fn push_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The shape as a Python tuple: `()`, `(5,)`, `(2, 3)`.
fn shape_tuple(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// The magic, version, header length and padded header of an array: everything before the
/// data. Its length is a multiple of [`ALIGN`].
pub fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_tuple(shape)
    );
    // 6 magic + 2 version + 2 length, then the dict, spaces, and the final newline.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let total = unpadded.next_multiple_of(ALIGN);
    let header_len = total - (MAGIC.len() + 2 + 2);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// The whole file of an array, in memory.
///
/// # Errors
/// [`Error::Npy`] when `data` does not hold `product(shape)` elements, or the header would not
/// fit the 16-bit length of version 1.0.
pub fn encode<E: NpyElement>(shape: &[usize], data: &[E]) -> Result<Vec<u8>> {
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count != Some(data.len()) {
        let count = count.map_or("more than usize::MAX".to_string(), |n| n.to_string());
        return Err(Error::Npy(format!(
            "shape {shape:?} holds {count} elements but {} were given",
            data.len()
        )));
    }
    let mut out = header(E::DESCR, shape);
    if out.len() > u16::MAX as usize {
        return Err(Error::Npy(format!(
            "the header of shape {shape:?} is too long for format 1.0"
        )));
    }
    out.reserve(data.len() * E::SIZE);
    for &x in data {
        x.push_le(&mut out);
    }
    Ok(out)
}

/// Writes an array of any [`NpyElement`] to `path`, as [`write_file`] does.
///
/// # Errors
/// As [`encode`] and [`write_file`].
pub fn write<E: NpyElement>(path: &Path, shape: &[usize], data: &[E]) -> Result<()> {
    write_file(path, &encode(shape, data)?)
}

/// Writes `bytes` to `path` without ever following a link and without leaving a partial file:
/// the bytes go to a new temporary file in the same directory (created exclusively, so a
/// planted link or file at that name is refused, not followed), which is then renamed over
/// `path`. A rename replaces the directory entry itself, so a symbolic link at `path` is
/// replaced by the file and its target is never written. On any failure the temporary file is
/// removed and `path` is as it was.
///
/// # Errors
/// [`Error::Write`] naming the file: a `path` with no file name, a directory at `path`, or an
/// I/O error.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |source: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let tmp = temp_name(dir, name);
    let written = (|| -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut out = BufWriter::new(file);
        out.write_all(bytes)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        // Only ours to remove: create_new made it, or it does not exist.
        let _ = std::fs::remove_file(&tmp);
        fail(e)
    })
}

/// A temporary name beside the final one, unique to this process and call: `.NAME.tmp.PID.N`.
fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp.{}.{n}", std::process::id()));
    dir.join(tmp)
}

/// Writes `f16` values as `<f2`.
///
/// # Errors
/// As [`write`](fn@write).
pub fn write_f16(path: &Path, shape: &[usize], data: &[half::f16]) -> Result<()> {
    write(path, shape, data)
}

/// Writes `f32` values as `<f4`.
///
/// # Errors
/// As [`write`](fn@write).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write(path, shape, data)
}

/// Writes `i32` values as `<i4`.
///
/// # Errors
/// As [`write`](fn@write).
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<()> {
    write(path, shape, data)
}

#[cfg(test)]
mod tests {

    #[cfg(unix)]
    #[test]
    fn writes_replace_links_never_follow_them_and_leave_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("twilight-npy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("q.npy");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_i32(&link, &[2], &[1, 2]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(
            std::fs::read(&link).unwrap(),
            encode(&[2], &[1i32, 2]).unwrap()
        );
        // A directory in the way is an error naming the path, and no temporary file remains.
        std::fs::create_dir(dir.join("o.npy")).unwrap();
        let err = write_f32(&dir.join("o.npy"), &[1], &[1.0]).unwrap_err();
        assert!(err.to_string().contains("o.npy"), "{err}");
        // A missing directory fails the same way.
        assert!(write_f32(&dir.join("nope/o.npy"), &[1], &[1.0]).is_err());
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["o.npy", "precious", "q.npy"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    #[test]
    fn tiny_i32_file_has_the_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write_i32(&path, &[2], &[1, -1]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let dict = b"{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }";
        let mut want = Vec::new();
        want.extend_from_slice(b"\x93NUMPY\x01\x00");
        // 10 bytes of prefix and a 57-byte dict do not fit 64: the data starts at 128, so the
        // header (dict, spaces, newline) is 118 bytes long, as NumPy itself writes it.
        assert_eq!(dict.len(), 57);
        want.extend_from_slice(&[118, 0]);
        want.extend_from_slice(dict);
        want.extend(std::iter::repeat_n(b' ', 118 - dict.len() - 1));
        want.push(b'\n');
        assert_eq!(want.len(), 128);
        want.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn f16_and_f32_values_are_little_endian() {
        let f16 = encode(
            &[1, 2],
            &[half::f16::from_f32(1.0), half::f16::from_f32(-2.0)],
        )
        .unwrap();
        assert_eq!(&f16[128..], &[0x00, 0x3c, 0x00, 0xc0]);
        assert!(f16[10..128]
            .starts_with(b"{'descr': '<f2', 'fortran_order': False, 'shape': (1, 2), }"));
        let f32 = encode(&[1], &[1.5f32]).unwrap();
        assert_eq!(&f32[128..], &1.5f32.to_le_bytes());
        assert!(
            f32[10..128].starts_with(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }")
        );
    }

    #[test]
    fn headers_are_aligned_for_every_rank() {
        for shape in [
            vec![],
            vec![0],
            vec![7],
            vec![3, 4],
            vec![123_456, 8, 16, 128],
            vec![1; 20],
            vec![usize::MAX / 4, 99_999_999_999, 1],
        ] {
            let h = header("<f4", &shape);
            assert_eq!(h.len() % ALIGN, 0, "{shape:?}");
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + len, h.len(), "{shape:?}");
            assert_eq!(*h.last().unwrap(), b'\n');
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.contains(&format!("'shape': {}, }}", shape_tuple(&shape))));
        }
        assert_eq!(shape_tuple(&[]), "()");
        assert_eq!(shape_tuple(&[5]), "(5,)");
        assert_eq!(shape_tuple(&[2, 3, 4]), "(2, 3, 4)");
    }

    #[test]
    fn a_wrong_length_is_an_error() {
        let err = encode(&[2, 3], &[1i32; 5]).unwrap_err();
        assert!(matches!(err, Error::Npy(_)));
        assert!(err.to_string().contains("6 elements"));
        assert!(encode(&[usize::MAX, 2], &[1i32]).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(write_f32(&dir.path().join("x.npy"), &[3], &[1.0]).is_err());
        let missing = dir.path().join("no-such-dir").join("x.npy");
        let err = write_f32(&missing, &[1], &[1.0]).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}
