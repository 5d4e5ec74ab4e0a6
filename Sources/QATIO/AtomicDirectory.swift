import Foundation
import QATCore

#if canImport(Glibc)
import Glibc
#endif

/// Builds a directory (a checkpoint, an export) under a temporary name beside its final
/// path and renames it into place only when every file in it is complete and fsynced, so a
/// crash at any moment leaves either no directory or a complete one. An existing directory
/// at the final path is replaced (moved aside, then removed after the rename).
public enum AtomicDirectory {
    public static func write(_ finalPath: String, _ body: (_ tmpDir: String) throws -> Void) throws {
        let fm = FileManager.default
        let parent = directoryName(finalPath)
        try fm.createDirectory(atPath: parent, withIntermediateDirectories: true)
        removeStaleLeftovers(of: fileName(finalPath), in: parent)
        let tmp = "\(parent)/.\(fileName(finalPath)).tmp-\(getpid())"
        try? fm.removeItem(atPath: tmp)
        try fm.createDirectory(atPath: tmp, withIntermediateDirectories: false)
        do {
            try body(tmp)
            try syncTree(tmp)
        } catch {
            try? fm.removeItem(atPath: tmp)
            throw error
        }
        var aside: String? = nil
        if fm.fileExists(atPath: finalPath) {
            aside = "\(parent)/.\(fileName(finalPath)).old-\(getpid())"
            try? fm.removeItem(atPath: aside!)
            guard rename(finalPath, aside!) == 0 else {
                try? fm.removeItem(atPath: tmp)
                throw QATError.io("\(finalPath): cannot move the previous directory aside: \(errnoString())")
            }
        }
        guard rename(tmp, finalPath) == 0 else {
            let e = errnoString()
            if let a = aside { _ = rename(a, finalPath) }
            try? fm.removeItem(atPath: tmp)
            throw QATError.io("\(finalPath): cannot rename the finished directory into place: \(e)")
        }
        fsyncPath(parent, directory: true)
        if let a = aside { try? fm.removeItem(atPath: a) }
    }

    /// Removes `.NAME.tmp-PID` / `.NAME.old-PID` left by writers of NAME that no longer run
    /// (a process killed mid-write).
    static func removeStaleLeftovers(of name: String, in dir: String) {
        guard let items = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return }
        for prefix in [".\(name).tmp-", ".\(name).old-"] {
            for i in items where i.hasPrefix(prefix) {
                guard let pid = Int32(i.dropFirst(prefix.count)), pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
                try? FileManager.default.removeItem(atPath: "\(dir)/\(i)")
            }
        }
    }

    /// Removes leftovers of interrupted writes (`.NAME.tmp-PID`, `.NAME.old-PID`) in a directory.
    public static func cleanLeftovers(in dir: String) {
        let fm = FileManager.default
        guard let items = try? fm.contentsOfDirectory(atPath: dir) else { return }
        for i in items where i.hasPrefix(".") && (i.contains(".tmp-") || i.contains(".old-")) {
            try? fm.removeItem(atPath: "\(dir)/\(i)")
        }
    }

    static func syncTree(_ dir: String) throws {
        let fm = FileManager.default
        for item in try fm.contentsOfDirectory(atPath: dir) {
            let p = "\(dir)/\(item)"
            var isDir: ObjCBool = false
            fm.fileExists(atPath: p, isDirectory: &isDir)
            if isDir.boolValue { try syncTree(p) } else { fsyncPath(p, directory: false) }
        }
        fsyncPath(dir, directory: true)
    }

    static func fsyncPath(_ p: String, directory: Bool) {
        let fd = open(p, directory ? (O_RDONLY | O_DIRECTORY | O_CLOEXEC) : (O_RDONLY | O_CLOEXEC))
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }
}
