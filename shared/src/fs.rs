//! Files both programs keep.

use std::path::Path;

/// Creates `dir` private to this user (mode 0700): the coordinator's data directory holds the
/// database and the CA's key, the agent's its host key and script logs. Missing parents get the
/// usual mode, as `mkdir -p` gives them: making `/srv` or `~/.local` private would lock others out
/// of what else is there. A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let made = (|| {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            r => r,
        }
    })();
    // A file in the way reads as "File exists" from mkdir: name it.
    made.map_err(|e| match dir.ancestors().find(|a| a.exists() && !a.is_dir()) {
        Some(file) => {
            std::io::Error::new(std::io::ErrorKind::NotADirectory, format!("{} is not a directory", file.display()))
        }
        None => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_file_in_the_way_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f.txt");
        std::fs::write(&file, "x").unwrap();
        for dir in [file.clone(), file.join("sub"), file.join("sub/deeper")] {
            let e = create_private_dir(&dir).unwrap_err();
            assert_eq!(e.to_string(), format!("{} is not a directory", file.display()));
        }
    }

    #[test]
    fn the_directory_is_private_and_its_new_parents_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // What the umask leaves of 0777, not 0700.
        assert_ne!(mode(&tmp.path().join("a/b")) & 0o077, 0, "a parent is not made private");
        // Again: the directory exists, nothing changes.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750, "an existing directory is left as it is");
        // A file in the way is an error.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(create_private_dir(&file).unwrap_err().kind(), std::io::ErrorKind::NotADirectory);
    }
}
