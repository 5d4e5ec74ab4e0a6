@_exported import QATCore
