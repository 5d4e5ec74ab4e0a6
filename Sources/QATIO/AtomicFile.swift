import QATCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Sequential writes to an open file descriptor, retrying short writes and EINTR.
public struct FileWriter {
    let fd: Int32
    let path: String
    public private(set) var written: Int = 0

    public mutating func write(_ buf: UnsafeRawBufferPointer) throws {
        guard var p = buf.baseAddress else { return }
        var left = buf.count
        while left > 0 {
            // Linux caps one write at ~2 GiB; chunking keeps large tensors working.
            let r = Glibc.write(fd, p, min(left, 1 << 30))
            if r < 0 {
                if errno == EINTR { continue }
                throw QATError.io("\(path): write failed: \(errnoString())")
            }
            p += r
            left -= r
            written += r
        }
    }

    public mutating func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }
}

/// Writes a file so that readers only ever see the old or the complete new content: the data
/// goes to a temporary file in the same directory (same filesystem, so `rename` is atomic), is
/// fsync'ed, then renamed over `path`; the directory is fsync'ed so the rename survives a crash.
/// On any error the temporary file is removed and `path` is untouched.
public func atomicWrite(path: String, _ body: (inout FileWriter) throws -> Void) throws {
    let dir = directoryName(path)
    let base = fileName(path)
    let tmp = "\(dir)/.\(base).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw QATError.io("\(path): cannot create a temporary file in \(dir): \(errnoString())") }
    var ok = false
    defer {
        if !ok {
            close(fd)
            unlink(tmp)
        }
    }
    var w = FileWriter(fd: fd, path: path)
    try body(&w)
    guard fsync(fd) == 0 else { throw QATError.io("\(path): fsync failed: \(errnoString())") }
    guard close(fd) == 0 else {
        ok = true  // the descriptor is gone either way; only unlink
        unlink(tmp)
        throw QATError.io("\(path): close failed: \(errnoString())")
    }
    ok = true
    guard rename(tmp, path) == 0 else {
        let e = errnoString()
        unlink(tmp)
        throw QATError.io("\(path): cannot rename the temporary file into place: \(e)")
    }
    let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if dfd >= 0 { _ = fsync(dfd); close(dfd) }
}

/// The directory part of a path ("." when there is none).
func directoryName(_ path: String) -> String {
    guard let i = path.lastIndex(of: "/") else { return "." }
    if i == path.startIndex { return "/" }
    return String(path[..<i])
}

func fileName(_ path: String) -> String {
    guard let i = path.lastIndex(of: "/") else { return path }
    return String(path[path.index(after: i)...])
}

func joinPath(_ dir: String, _ name: String) -> String {
    dir.hasSuffix("/") ? dir + name : "\(dir)/\(name)"
}

func isDirectory(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
}

func fileExists(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0
}
