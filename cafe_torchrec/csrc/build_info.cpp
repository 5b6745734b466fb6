// The hash of the sources this library was built from (setup.py defines CAFE_SOURCE_HASH as a bare
// token), kept as a marker string: cafe_torchrec.ops reads it from the file before loading the
// library, so a library built from other sources (an edited checkout) is never loaded.
#ifndef CAFE_SOURCE_HASH
#define CAFE_SOURCE_HASH unknown
#endif
#define CAFE_STRING(x) #x
#define CAFE_EXPANDED_STRING(x) CAFE_STRING(x)

extern "C" {
__attribute__((used)) const char cafe_source_hash[] = "cafe-source-hash:" CAFE_EXPANDED_STRING(CAFE_SOURCE_HASH);
}
