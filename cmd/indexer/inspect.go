package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/cli"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// remoteFlags are the registry flags of the inspection commands.
type remoteFlags struct{ plainHTTP, insecure bool }

func (f *remoteFlags) add(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.plainHTTP, "plain-http", false, "talk plain HTTP to the registry")
	cmd.Flags().BoolVar(&f.insecure, "insecure", false, "skip TLS certificate verification")
}

func (f *remoteFlags) repo(ref string) (*registry.Repository, error) {
	return registry.New(ref, registry.Options{PlainHTTP: f.plainHTTP, Insecure: f.insecure})
}

// maxZtocSize bounds a zTOC read from a registry (SOCI's zTOCs are a few
// percent of a layer; this leaves room for multi-GB layers).
const maxZtocSize = 1 << 30

// isLocalArg reports whether arg names a local file: one exists by that
// name, or arg is no REF@<digest>.
func isLocalArg(arg string) bool {
	_, err := os.Stat(arg)
	return err == nil || !strings.Contains(arg, "@")
}

// resolveBlob resolves arg, a REF@sha256:<digest> naming a blob (what says
// which, for the error when arg has no digest), to its repository and the
// blob's descriptor.
func (f *remoteFlags) resolveBlob(ctx context.Context, arg, what string) (*registry.Repository, ocispec.Descriptor, error) {
	repo, err := f.repo(arg)
	if err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	d, err := digest.Parse(repo.Reference())
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("%s: want REF@sha256:<%s digest>: %w", arg, what, err)
	}
	desc, err := repo.ResolveBlob(ctx, d)
	if err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	return repo, desc, nil
}

// loadZtocArg reads a zTOC from a local file or, for REF@sha256:<digest>
// (when no such file exists), straight from the registry. It returns the
// zTOC and its size.
func loadZtocArg(ctx context.Context, arg string, rf *remoteFlags) (*ztoc.Ztoc, int64, error) {
	b, err := readZtocArg(ctx, arg, rf)
	if err != nil {
		return nil, 0, err
	}
	z, err := ztoc.Unmarshal(b)
	if err != nil {
		return nil, 0, fmt.Errorf("read zTOC %s: %w", arg, err)
	}
	return z, int64(len(b)), nil
}

// readZtocArg returns the bytes of the zTOC arg names (see loadZtocArg).
func readZtocArg(ctx context.Context, arg string, rf *remoteFlags) ([]byte, error) {
	if isLocalArg(arg) {
		return os.ReadFile(arg)
	}
	repo, desc, err := rf.resolveBlob(ctx, arg, "zTOC")
	if err != nil {
		return nil, err
	}
	return repo.FetchBlobBytes(ctx, desc, maxZtocSize)
}

// openLayerArg opens a layer for span reads: a local file or, for
// REF@sha256:<layer digest> (when no such file exists), HTTP range reads
// from the registry. It returns the layer's size.
func openLayerArg(ctx context.Context, arg string, rf *remoteFlags) (span.BlobReader, int64, func(), error) {
	if isLocalArg(arg) {
		f, err := os.Open(arg)
		if err != nil {
			return nil, 0, nil, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, 0, nil, err
		}
		return span.LocalBlob(f), st.Size(), func() { f.Close() }, nil
	}
	repo, desc, err := rf.resolveBlob(ctx, arg, "layer")
	if err != nil {
		return nil, 0, nil, err
	}
	blob, err := repo.BlobReader(desc)
	if err != nil {
		return nil, 0, nil, err
	}
	return blob, desc.Size, func() {}, nil
}

func newIndexCommand() *cobra.Command {
	return cli.Group(&cobra.Command{Use: "index", Short: "Inspect the SOCI indexes of images in a registry"},
		newIndexListCommand(), newIndexInfoCommand())
}

// indexEntry is one SOCI index of an image, as "index ls --json" prints it.
type indexEntry struct {
	Digest   digest.Digest `json:"digest"`
	Version  string        `json:"version"`
	Platform string        `json:"platform"`
	Manifest digest.Digest `json:"manifest"`
	Ztocs    int           `json:"ztocs"`
	// Prefetches counts prefetch artifacts, of the workloads named.
	Prefetches    int      `json:"prefetches"`
	PrefetchNames []string `json:"prefetchNames,omitempty"`
	Size          int64    `json:"size"`
	// Packs counts spanpull's pack blobs (heads and windows), PackSize
	// their bytes.
	Packs    int   `json:"packs"`
	PackSize int64 `json:"packSize"`
}

func newIndexEntry(s soci.IndexSummary) indexEntry {
	e := indexEntry{Digest: s.Index.Digest, Version: s.Version.String(), Manifest: s.Manifest, Ztocs: s.Descriptors - s.Prefetches, Size: s.Size,
		Prefetches: s.Prefetches, PrefetchNames: s.PrefetchNames,
		Packs: s.Packs, PackSize: s.PackSize}
	if s.Platform != nil {
		e.Platform = platforms.Format(*s.Platform)
	}
	return e
}

// prefetchColumn shows an index's prefetch artifacts in index ls: their
// count and workload names ("-" for none).
func prefetchColumn(e indexEntry) string {
	if e.Prefetches == 0 {
		return "-"
	}
	names := make([]string, len(e.PrefetchNames))
	for i, n := range e.PrefetchNames {
		names[i] = n
		if n == "" {
			names[i] = "(unnamed)"
		}
	}
	return fmt.Sprintf("%d (%s)", e.Prefetches, strings.Join(names, ","))
}

func newIndexListCommand() *cobra.Command {
	var rf remoteFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls REF",
		Aliases: []string{"list"},
		Short:   "List the SOCI indexes of an image (v1 referrers and v2 entries)",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			repo, err := rf.repo(args[0])
			if err != nil {
				return err
			}
			found, err := soci.List(cmd.Context(), repo)
			if err != nil {
				return err
			}
			entries := make([]indexEntry, len(found))
			for i, f := range found {
				entries[i] = newIndexEntry(f)
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(entries)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "DIGEST\tVERSION\tPLATFORM\tZTOCS\tZTOC BYTES\tPREFETCH\tPACK BLOBS\tPACK BYTES\tIMAGE MANIFEST")
			for _, e := range entries {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%d\t%d\t%s\n", e.Digest, e.Version, e.Platform, e.Ztocs, e.Size, prefetchColumn(e), e.Packs, e.PackSize, e.Manifest)
			}
			return w.Flush()
		},
	}
	rf.add(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newIndexInfoCommand() *cobra.Command {
	var rf remoteFlags
	cmd := &cobra.Command{
		Use:   "info REF|REPO@DIGEST",
		Short: "Print one SOCI index manifest",
		Long: `info prints a SOCI index manifest: REPO@DIGEST names the index itself; an
image REF prints the image's index when it has exactly one (see "index ls").
The zTOC descriptors come first, then prefetch artifacts (see "prefetch
attach"); spanpull's pack blobs, if any, follow them (media types
application/vnd.spanpull.ztoc.head.v1+zstd and
application/vnd.spanpull.ztoc.windows.v1, annotated with the layer and the
zTOC they describe). When the index has prefetch artifacts, a table of them
(name, layer, span ranges, spans) follows on stderr, so that stdout stays
the manifest alone.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := digest.Parse(args[0]); err == nil {
				return fmt.Errorf("%s: a digest alone names no repository: use REPO@%s", args[0], args[0])
			}
			repo, err := rf.repo(args[0])
			if err != nil {
				return err
			}
			b, err := soci.Info(cmd.Context(), repo)
			var ambiguous *soci.AmbiguousError
			switch {
			case errors.Is(err, soci.ErrNoIndex):
				return fmt.Errorf("%s is not a SOCI index and has none", args[0])
			case errors.As(err, &ambiguous):
				return fmt.Errorf("%s has %d SOCI indexes: name one with REPO@DIGEST (see indexer index ls)", args[0], ambiguous.Indexes)
			case err != nil:
				return err
			}
			var out bytes.Buffer
			if err := json.Indent(&out, b, "", "  "); err != nil {
				return err
			}
			out.WriteByte('\n')
			if _, err = out.WriteTo(cmd.OutOrStdout()); err != nil {
				return err
			}
			return printPrefetches(cmd.Context(), cmd.ErrOrStderr(), repo, b)
		},
	}
	rf.add(cmd)
	return cmd
}

// printPrefetches writes a table of the prefetch artifacts of index b to
// w (stderr: stdout stays the manifest JSON alone, for scripts): name,
// layer, span ranges and spans of each, read from the registry.
func printPrefetches(ctx context.Context, w io.Writer, repo *registry.Repository, b []byte) error {
	ix, err := index.Parse(b)
	if err != nil || len(ix.Prefetches) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "prefetch artifacts (%s):\nNAME\tLAYER\tRANGES\tSPANS\tDIGEST\n", index.MediaTypePrefetch)
	for _, p := range ix.Prefetches {
		name := p.Name
		if name == "" {
			name = "(unnamed)"
		}
		ranges, spans := "unreadable", "-"
		pb, err := repo.FetchBlobBytes(ctx, p.Blob, index.MaxPrefetchSize)
		var a *index.PrefetchArtifact
		if err == nil {
			a, err = index.ParsePrefetch(pb)
		}
		if err != nil {
			spans = err.Error()
		} else {
			ranges, spans = fmt.Sprint(len(a.PrefetchSpans)), fmt.Sprint(a.Spans())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", name, p.LayerDigest, ranges, spans, p.Blob.Digest)
	}
	return tw.Flush()
}
