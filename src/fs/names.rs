//! Which object-key components can be file names. Keys are arbitrary strings; a file name
//! is not: `a//b` yields an empty component, `.` and `..` would alias other directories,
//! and NUL or over-long names are rejected by the kernel. Such entries are hidden (and
//! logged), never mapped to something else, so nothing escapes the mount.

/// Longest name Linux accepts (NAME_MAX).
const NAME_MAX: usize = 255;

/// Why a key component cannot be shown, or `None` if it can.
pub fn invalid_reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty path component (key contains '//')")
    } else if name == "." || name == ".." {
        Some("'.' or '..' component")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else if name.len() > NAME_MAX {
        Some("longer than 255 bytes")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_cannot_be_a_file_name() {
        for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
            assert!(invalid_reason(bad).is_some(), "{bad:?}");
        }
        for good in [
            "a",
            "...",
            ".hidden",
            "with space",
            "ünïcødé 文件",
            &"x".repeat(255),
        ] {
            assert!(invalid_reason(good).is_none(), "{good:?}");
        }
    }
}
