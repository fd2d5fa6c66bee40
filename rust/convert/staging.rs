//! Atomic output: everything is written into a hidden sibling of the destination and renamed into
//! place; any error, cancellation or a stale temporary from a killed run is cleaned up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Names of the files directly in `dir`, sorted.
pub(crate) fn staged_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        names.push(PathBuf::from(e.file_name()));
    }
    names.sort();
    Ok(names)
}

/// Reads and removes a JSON object file, if there is one.
pub(crate) fn take_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(Error::format(path, "expected a JSON object")),
    }
}

pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| Error::io(path, e))?;
    io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// The temporary sibling of the destination, removed on drop unless committed.
pub(crate) struct Staging {
    pub(crate) dst: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) is_dir: bool,
    pub(crate) committed: bool,
}

impl Staging {
    pub(crate) fn begin(dst: &Path, is_dir: bool, force: bool) -> Result<Staging> {
        let name = dst
            .file_name()
            .ok_or_else(|| Error::unsupported(format!("destination {} has no file name", dst.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match fs::metadata(&parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(&parent, io::Error::new(io::ErrorKind::NotADirectory, "not a directory (parent of the destination)")))
            }
            Err(e) => return Err(Error::io(&parent, e)),
        }
        if !force && fs::symlink_metadata(dst).is_ok() {
            return Err(Error::Exists { path: dst.to_path_buf() });
        }
        remove_stale_temporaries(&parent, &name);
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if fs::symlink_metadata(&tmp).is_ok() {
            remove_path(&tmp);
        }
        if is_dir {
            fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(Staging { dst: dst.to_path_buf(), tmp, is_dir, committed: false })
    }

    pub(crate) fn commit(mut self, sync: bool) -> Result<()> {
        if sync && self.is_dir {
            sync_dir(&self.tmp);
        }
        let io = |p: &Path, e| Error::io(p, e);
        if fs::symlink_metadata(&self.dst).is_ok() {
            // --force: swap the old output out, the new one in, then delete the old one.
            let parent = self.tmp.parent().expect("tmp has a parent").to_path_buf();
            let name = self.dst.file_name().expect("checked").to_string_lossy().into_owned();
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            remove_path(&old);
            fs::rename(&self.dst, &old).map_err(|e| io(&self.dst, e))?;
            if let Err(e) = fs::rename(&self.tmp, &self.dst) {
                let _ = fs::rename(&old, &self.dst);
                return Err(io(&self.dst, e));
            }
            remove_path(&old);
        } else {
            fs::rename(&self.tmp, &self.dst).map_err(|e| io(&self.dst, e))?;
        }
        self.committed = true;
        if sync {
            if let Some(p) = self.dst.parent() {
                sync_dir(if p.as_os_str().is_empty() { Path::new(".") } else { p });
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            remove_path(&self.tmp);
        }
    }
}

pub(crate) fn remove_path(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

pub(crate) fn sync_dir(p: &Path) {
    // Directory fsync makes the rename durable on POSIX; not supported everywhere, so best effort.
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

/// Removes `.<name>.tmp-<pid>` siblings left by conversions that were killed (their process no
/// longer exists). Only checkable where /proc exists; elsewhere they are left alone.
pub(crate) fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_path(&e.path());
        }
    }
}
