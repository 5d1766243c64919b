"""Generated code of the genstruct.v1 contract (protos/genstruct/v1/genstruct.proto)."""
