use super::*;

fn store(test: &str) -> ImageStore {
    let dir = std::env::temp_dir().join(format!("berth-images-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ImageStore::open(dir).unwrap()
}

fn header(name: &str, kind: &str) -> ImportHeader {
    ImportHeader {
        name: name.into(),
        kind: kind.into(),
        source: "stream".into(),
        ..Default::default()
    }
}

fn import(store: &ImageStore, h: ImportHeader, bytes: &[u8]) -> Result<ImageRecord, ImageError> {
    let mut imp = store.begin_import(h)?;
    for chunk in bytes.chunks(1000) {
        imp.write(chunk)?;
    }
    store.commit(imp)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// sha256("hello\n")
const HELLO: &str = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

#[test]
fn an_import_is_stored_by_its_digest_and_found_by_name_or_digest() {
    let s = store("ok");
    let r = import(&s, header("k1", "kernel"), b"hello\n").unwrap();
    assert_eq!(r.digest, HELLO);
    assert_eq!(r.size_bytes, 6);
    assert_eq!(std::fs::read(s.blob_path(HELLO)).unwrap(), b"hello\n");
    assert_eq!(s.get("k1").unwrap(), r);
    assert_eq!(s.get(HELLO).unwrap().name, "k1");
    // Same name, same content: no change. Other content: refused.
    assert_eq!(import(&s, header("k1", "kernel"), b"hello\n").unwrap(), r);
    let e = import(&s, header("k1", "kernel"), b"other\n").unwrap_err();
    assert!(matches!(e, ImageError::AlreadyExists(_)), "{e}");
    assert!(files(&s.root().join("tmp")).is_empty());
}

#[test]
fn a_digest_mismatch_leaves_nothing_behind() {
    let s = store("mismatch");
    let mut h = header("d1", "disk");
    h.expected_digest = format!("sha256:{}", "0".repeat(64));
    let e = import(&s, h, b"hello\n").unwrap_err();
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert!(files(&s.root().join("tmp")).is_empty());
    assert!(files(&s.root().join("blobs")).is_empty());
    assert!(files(&s.root().join("index")).is_empty());
    let mut h = header("d1", "disk");
    h.expected_digest = HELLO.into();
    import(&s, h, b"hello\n").unwrap();
}

#[test]
fn a_short_or_long_stream_is_refused() {
    let s = store("length");
    let mut h = header("d2", "disk");
    h.size_bytes = 10;
    let e = import(&s, h.clone(), b"hello\n").unwrap_err();
    assert!(e.to_string().contains("after 6 of the announced 10"), "{e}");
    let e = import(&s, h, &[1u8; 11]).unwrap_err();
    assert!(e.to_string().contains("more than the announced"), "{e}");
    assert!(files(&s.root().join("tmp")).is_empty());
}

#[test]
fn remove_refuses_while_used_and_keeps_a_blob_another_name_holds() {
    let s = store("remove");
    import(&s, header("a", "disk"), b"hello\n").unwrap();
    import(&s, header("b", "disk"), b"hello\n").unwrap();
    let e = s.remove("a", &["vm-1".into()]).unwrap_err();
    assert!(e.to_string().contains("used by VM(s) vm-1"), "{e}");
    s.remove("a", &[]).unwrap();
    assert!(s.blob_path(HELLO).exists(), "b still holds it");
    s.remove("b", &[]).unwrap();
    assert!(!s.blob_path(HELLO).exists());
    assert!(matches!(s.get("a"), Err(ImageError::NotFound(_))));
}

#[test]
fn bad_headers_are_refused_by_field() {
    let s = store("headers");
    for (h, needle) in [
        (header("Bad_Name", "disk"), "name"),
        (header("x", "floppy"), "kind"),
        (
            ImportHeader {
                format: "vmdk".into(),
                ..header("x", "disk")
            },
            "format",
        ),
        (
            ImportHeader {
                expected_digest: "md5:abc".into(),
                ..header("x", "disk")
            },
            "expected_digest",
        ),
    ] {
        let e = s.begin_import(h).err().expect("refused");
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn a_sparse_copy_keeps_holes_and_content() {
    let dir = std::env::temp_dir().join(format!("berth-copy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("image");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tail", (8 << 20) - 4).unwrap();
    let dest = dir.join("copy");
    let method = copy_for_vm(&image, &dest).unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&image).unwrap()
    );
    if method == CopyMethod::SparseCopy {
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dest).unwrap());
        assert!(blocks * 512 < 1 << 20, "{} bytes allocated", blocks * 512);
    }
    assert!(!dir.join("copy.copying").exists());
}
