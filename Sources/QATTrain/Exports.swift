@_exported import QATCore
@_exported import QATDistributed
