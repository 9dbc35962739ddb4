// Command indexer builds zTOCs for gzip OCI layers and publishes them as
// SOCI indexes next to images already in a registry. It also inspects
// zTOCs and indexes.
package main

import (
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/internal/cli"
)

func main() {
	cli.Main("indexer", newRootCommand())
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "indexer",
		Short: "Index gzip OCI images for lazy pulling (SOCI-compatible zTOCs and indexes)",
		Long: `indexer streams each layer of an image once, records a zTOC (the tar table of
contents plus decompressor checkpoints every span-size bytes of output) and
publishes the zTOCs next to the image, so a lazy snapshotter can start
containers after fetching only the bytes they read.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newZtocCommand(), newCreateCommand(), newConvertCommand(), newIndexCommand(), newPrefetchCommand())
	return root
}

// memoryPerLayer is the soft memory limit per layer being indexed: the
// zTOC under construction plus the pipeline buffers fit well within it,
// and without a limit Go's GC lets the heap grow to twice the live set.
const memoryPerLayer = 48 << 20

// limitMemory sets Go's soft memory limit for indexing layers at once,
// unless the user set GOMEMLIMIT. A soft limit never fails an allocation:
// past it the GC just works harder.
func limitMemory(layers int) {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(max(layers, 1)) * memoryPerLayer)
	}
}
