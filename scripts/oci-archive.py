#!/usr/bin/env python3
"""Write and verify a one-layer OCI image archive, with Python's standard library only.

  oci-archive.py build --rootfs DIR --out FILE --tag NAME:TAG [--label K=V ...]
                       [--entrypoint PATH] [--env K=V ...] [--arch amd64] [--created EPOCH]
  oci-archive.py verify FILE [--extract DIR]

`build` packs DIR (a root filesystem, e.g. from mmdebstrap) into one gzipped
layer and writes an OCI image layout as a tar (oci-layout, index.json,
blobs/sha256/...): what `skopeo copy oci-archive:FILE ...`, `podman load` and
`ctr images import` read. The output is reproducible: entries sorted, mtimes
clamped to --created (SOURCE_DATE_EPOCH), numeric owners only, gzip without a
timestamp. The contents of dev/, proc/, sys/ and tmp/ are left out (the runtime
provides them); the directories themselves stay.

`verify` checks an archive: layout version, every descriptor's digest and size,
that the manifest references the config and the layer, that the config's
diff_ids are the digests of the uncompressed layers and that it has an
entrypoint, os and architecture. With --extract it unpacks the layer into DIR
(with GNU tar, as root: owners, modes, device nodes and hard links kept) after
checking that no entry escapes DIR. It prints one `PASS: ...` or `FAIL: ...`
line per check and exits 1 if any failed.

No tool is downloaded or pulled: this is why it exists (no container registry
and no container engine where the image is built).
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import zlib

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

# Directories whose contents do not belong in an image layer.
EMPTY_DIRS = {"dev", "proc", "sys", "tmp"}


def rfc3339(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class HashingWriter:
    """A write-only file that hashes (and counts) what passes through it."""

    def __init__(self, inner):
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def walk(root):
    """Relative paths under root, sorted, each directory before its contents."""
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        with os.scandir(full) as it:
            names = sorted(e.name for e in it)
        if rel in EMPTY_DIRS:
            names = []
        subdirs = []
        for name in names:
            path = f"{rel}/{name}" if rel else name
            yield path
            if stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def write_layer(rootfs, path, created):
    """Gzipped tar of rootfs at path; returns (compressed digest, size, uncompressed digest)."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            hw = HashingWriter(gz)
            with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for rel in walk(rootfs):
                    full = os.path.join(rootfs, rel)
                    ti = tar.gettarinfo(full, arcname=rel)
                    if ti is None:  # a socket: not representable, not needed
                        continue
                    ti.uname = ti.gname = ""
                    ti.mtime = min(int(ti.mtime), created)
                    if ti.isreg():
                        with open(full, "rb") as f:
                            tar.addfile(ti, f)
                    else:
                        tar.addfile(ti)
    uncompressed = hw.digest()
    size = os.path.getsize(path)
    return file_digest(path), size, uncompressed


def file_digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def containerd_name(tag):
    """docker.io/library/NAME:TAG for a short name, as Docker and containerd spell it."""
    first, _, rest = tag.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return tag
    if not rest:
        return "docker.io/library/" + tag
    return "docker.io/" + tag


def build(args):
    created = args.created
    if created is None:
        created = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    labels = dict(kv.split("=", 1) for kv in args.label)
    env = args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    layer_tmp = out + ".layer.tmp"
    try:
        layer_digest, layer_size, diff_id = write_layer(args.rootfs, layer_tmp, created)
        config = {
            "created": rfc3339(created),
            "architecture": args.arch,
            "os": "linux",
            "config": {
                "Entrypoint": args.entrypoint,
                "Env": env,
                "Labels": labels,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": rfc3339(created), "created_by": args.created_by}],
        }
        config_bytes = canonical(config)
        config_desc = {
            "mediaType": MT_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config_desc,
            "layers": [{"mediaType": MT_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
            "annotations": {"org.opencontainers.image.created": rfc3339(created)},
        }
        manifest_bytes = canonical(manifest)
        manifest_desc = {
            "mediaType": MT_MANIFEST,
            "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            "size": len(manifest_bytes),
            "platform": {"architecture": args.arch, "os": "linux"},
            "annotations": {
                "org.opencontainers.image.ref.name": args.tag,
                "io.containerd.image.name": containerd_name(args.tag),
            },
        }
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]}

        def info(name, size, mode=0o644, kind=tarfile.REGTYPE):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.type, ti.mtime = size, mode, kind, created
            return ti

        out_tmp = out + ".tmp"
        with tarfile.open(out_tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            def add_bytes(name, data):
                tar.addfile(info(name, len(data)), io.BytesIO(data))

            add_bytes("oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
            tar.addfile(info("blobs", 0, 0o755, tarfile.DIRTYPE))
            tar.addfile(info("blobs/sha256", 0, 0o755, tarfile.DIRTYPE))
            with open(layer_tmp, "rb") as f:
                tar.addfile(info("blobs/sha256/" + layer_digest[7:], layer_size), f)
            add_bytes("blobs/sha256/" + config_desc["digest"][7:], config_bytes)
            add_bytes("blobs/sha256/" + manifest_desc["digest"][7:], manifest_bytes)
            add_bytes("index.json", canonical(index))
        os.replace(out_tmp, out)
    finally:
        for p in (layer_tmp, out + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
    print(f"wrote {out}: {os.path.getsize(out)} bytes, manifest {manifest_desc['digest']}, "
          f"layer {layer_size} bytes gzipped")
    return 0


class Checker:
    def __init__(self):
        self.failed = 0

    def check(self, ok, what, detail=""):
        print(("PASS: " if ok else "FAIL: ") + what + (f" ({detail})" if detail and not ok else ""))
        if not ok:
            self.failed += 1
        return ok


def safe_member(name):
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts


def verify(args):
    c = Checker()
    try:
        tar = tarfile.open(args.archive, "r:")
    except (OSError, tarfile.TarError) as e:
        c.check(False, f"{args.archive} is a tar archive", str(e))
        return 1
    with tar:
        members = {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}

        def read(name):
            m = members.get(name)
            if m is None or not m.isfile():
                return None
            return tar.extractfile(m).read()

        def load_json(name):
            data = read(name)
            if data is None:
                return None
            try:
                return json.loads(data)
            except ValueError:
                return None

        def blob(desc, what, media_types):
            """The blob a descriptor names, after checking its media type, size and digest."""
            if not isinstance(desc, dict):
                c.check(False, f"{what} descriptor present")
                return None
            digest, size = desc.get("digest", ""), desc.get("size")
            name = "blobs/sha256/" + digest.removeprefix("sha256:")
            c.check(desc.get("mediaType") in media_types, f"{what} media type", str(desc.get("mediaType")))
            m = members.get(name)
            if not c.check(digest.startswith("sha256:") and m is not None and m.isfile(),
                           f"{what} blob {digest[:19]}... is in the archive"):
                return None
            c.check(m.size == size, f"{what} size matches its descriptor", f"{m.size} != {size}")
            f = tar.extractfile(m)
            sha = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
            c.check("sha256:" + sha.hexdigest() == digest, f"{what} digest matches its content")
            return m

        c.check(all(safe_member(n) for n in members), "archive paths are relative")
        c.check(load_json("oci-layout") == {"imageLayoutVersion": "1.0.0"}, "oci-layout is version 1.0.0")
        index = load_json("index.json")
        if not c.check(isinstance(index, dict) and index.get("schemaVersion") == 2
                       and len(index.get("manifests") or []) == 1, "index.json lists one manifest"):
            return 1
        mdesc = index["manifests"][0]
        ref = (mdesc.get("annotations") or {}).get("org.opencontainers.image.ref.name", "")
        c.check(bool(ref), "index.json names the image (org.opencontainers.image.ref.name)")
        if ref:
            print(f"  image name: {ref}")
        mm = blob(mdesc, "manifest", {MT_MANIFEST})
        if mm is None:
            return 1
        manifest = json.loads(tar.extractfile(mm).read())
        c.check(manifest.get("schemaVersion") == 2, "manifest schemaVersion is 2")
        cm = blob(manifest.get("config"), "config", {MT_CONFIG})
        layers = manifest.get("layers") or []
        c.check(len(layers) >= 1, "manifest references a layer")
        config = json.loads(tar.extractfile(cm).read()) if cm is not None else {}
        c.check(config.get("os") == "linux" and bool(config.get("architecture")),
                "config has os linux and an architecture", f"{config.get('os')}/{config.get('architecture')}")
        if mdesc.get("platform"):
            c.check(mdesc["platform"].get("architecture") == config.get("architecture"),
                    "index platform matches the config's architecture")
        cfg = config.get("config") or {}
        c.check(bool(cfg.get("Entrypoint")), "config has an entrypoint", str(cfg.get("Entrypoint")))
        c.check(any(e.startswith("PATH=") for e in cfg.get("Env") or []), "config sets PATH")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        c.check((config.get("rootfs") or {}).get("type") == "layers" and len(diff_ids) == len(layers),
                "config has one diff_id per layer")
        for i, ldesc in enumerate(layers):
            lm = blob(ldesc, f"layer {i}", {MT_LAYER_GZIP, MT_LAYER_TAR})
            if lm is None:
                continue
            gz = ldesc.get("mediaType") == MT_LAYER_GZIP
            try:
                f = tar.extractfile(lm)
                raw = gzip.GzipFile(fileobj=f) if gz else f
                sha = hashlib.sha256()
                for chunk in iter(lambda: raw.read(1 << 20), b""):
                    sha.update(chunk)
                f = tar.extractfile(lm)
                with tarfile.open(fileobj=f, mode="r|gz" if gz else "r|") as layer:
                    names = [m.name for m in layer]
            except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
                c.check(False, f"layer {i} is a readable {'gzipped ' if gz else ''}tar", str(e))
                continue
            c.check(i < len(diff_ids) and diff_ids[i] == "sha256:" + sha.hexdigest(),
                    f"layer {i} diff_id is the digest of its uncompressed tar")
            bad = [n for n in names if not safe_member(n)]
            c.check(not bad, f"layer {i}: all {len(names)} paths stay inside the root", ", ".join(bad[:3]))
            if args.extract and not bad:
                os.makedirs(args.extract, exist_ok=True)
                f = tar.extractfile(lm)
                cmd = ["tar", "-x", "--numeric-owner", "-p", "-C", args.extract] + (["-z"] if gz else [])
                r = subprocess.run(cmd, input=f.read(), stderr=subprocess.PIPE)
                c.check(r.returncode == 0, f"layer {i} unpacks into {args.extract}",
                        r.stderr.decode(errors="replace").strip())
    return 1 if c.failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pack a root filesystem into an OCI image archive")
    b.add_argument("--rootfs", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tag", required=True, help="NAME:TAG, the org.opencontainers.image.ref.name annotation")
    b.add_argument("--label", action="append", default=[], help="K=V image label (repeatable)")
    b.add_argument("--env", action="append", default=[], help="K=V (repeatable; default PATH only)")
    b.add_argument("--entrypoint", nargs="+", default=["/usr/local/bin/blockfence"])
    b.add_argument("--arch", default="amd64", help="OCI architecture (amd64, arm64, ...)")
    b.add_argument("--created", type=int, help="creation time, seconds since the epoch "
                   "(default SOURCE_DATE_EPOCH, else now); later file mtimes are clamped to it")
    b.add_argument("--created-by", default="scripts/build-image", help="history entry")
    v = sub.add_parser("verify", help="check an OCI image archive")
    v.add_argument("archive")
    v.add_argument("--extract", metavar="DIR", help="unpack the layer(s) into DIR")
    args = p.parse_args()
    if args.cmd == "build":
        sys.exit(build(args))
    try:
        sys.exit(verify(args))
    except Exception as e:  # a malformed archive: report it as a failed check
        print(f"FAIL: {args.archive} is a well-formed OCI image archive ({type(e).__name__}: {e})")
        sys.exit(1)


if __name__ == "__main__":
    main()
