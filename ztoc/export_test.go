package ztoc

// The golden vectors, for the tests in package ztoc_test (they use
// toctest, which imports ztoc, so they cannot be in package ztoc).

var (
	Goldens      = goldens
	ReadGolden   = readGolden
	GoldenLayers = goldenLayers
)
