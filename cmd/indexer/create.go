package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/store"
	"github.com/spanpull/spanpull/ztoc"
)

// defaultMinLayerSize is SOCI's: smaller layers are pulled whole, cheaply.
const defaultMinLayerSize = 10 << 20

func addIndexFlags(cmd *cobra.Command, o *indexOptions) {
	f := cmd.Flags()
	f.Int64Var(&o.SpanSize, "span-size", ztoc.DefaultSpanSize, "uncompressed bytes between checkpoints")
	f.Int64Var(&o.MinLayerSize, "min-layer-size", defaultMinLayerSize, "skip layers whose compressed size is below this many bytes")
	f.StringArrayVar(&o.Platforms, "platform", nil, "platform to index, os/arch[/variant] (repeatable; default: this machine's)")
	f.BoolVar(&o.AllPlatforms, "all-platforms", false, "index every platform of an image index")
	f.BoolVar(&o.PlainHTTP, "plain-http", false, "talk plain HTTP to the registry")
	f.BoolVar(&o.Insecure, "insecure", false, "skip TLS certificate verification")
	f.DurationVar(&o.Timeout, "timeout", registry.DefaultStallTimeout, "give up on a registry request that makes no progress for this long (it is retried a few times)")
	f.IntVar(&o.Concurrency, "concurrency", runtime.NumCPU(), "layers indexed at once")
	f.BoolVar(&o.Force, "force", false, "rebuild zTOCs even when the registry or the local cache has them")
	f.BoolVarP(&o.Quiet, "quiet", "q", false, "print only the resulting digest")
	f.BoolVar(&o.JSON, "json", false, "print a JSON report")
	f.StringVar(&o.CacheDir, "cache-dir", defaultCacheDir(), "local cache of built zTOCs")
	f.BoolVar(&o.NoCache, "no-cache", false, "neither read nor write the local zTOC cache")
}

func defaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "spanpull")
	}
	return ""
}

func (o indexOptions) registryOptions() registry.Options {
	return registry.Options{PlainHTTP: o.PlainHTTP, Insecure: o.Insecure, StallTimeout: o.Timeout}
}

func (o indexOptions) validate() error {
	if o.SpanSize <= 0 {
		return fmt.Errorf("--span-size must be positive, got %d", o.SpanSize)
	}
	if o.MinLayerSize < 0 {
		return fmt.Errorf("--min-layer-size must not be negative")
	}
	if o.Quiet && o.JSON {
		return errors.New("--quiet and --json exclude each other")
	}
	return nil
}

// newPublisher wires a publisher for src -> dst; close releases it.
func newPublisher(o indexOptions, src, dst *registry.Repository, stdout, stderr io.Writer) (p *publisher, closeFn func(), err error) {
	limitMemory(o.Concurrency)
	p = &publisher{opts: o, src: src, dst: dst, log: stdout, builds: make(map[digest.Digest]*layerBuild)}
	if !o.NoCache && o.CacheDir != "" {
		if p.cache, err = store.OpenZtocCache(o.CacheDir); err != nil {
			return nil, nil, err
		}
	}
	p.progress = newProgress(stderr, !o.Quiet && !o.JSON && isTerminal(stderr))
	return p, func() {
		p.progress.close()
		if p.cache != nil {
			p.cache.Close()
		}
	}, nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// runReport is the --json output of create and convert.
type runReport struct {
	Image  string `json:"image"`
	Target string `json:"target,omitempty"`
	// TargetDigest is the digest of the SOCI-enabled image convert pushed.
	TargetDigest digest.Digest     `json:"targetDigest,omitempty"`
	Platforms    []*platformResult `json:"platforms"`
}

func newCreateCommand() *cobra.Command {
	var o indexOptions
	cmd := &cobra.Command{
		Use:   "create [flags] REF",
		Short: "Index an image in its registry and attach a SOCI index v1 (OCI referrer)",
		Long: `create resolves REF (a tag or digest; an image index or a single manifest),
streams every gzip or tar layer of each selected platform once from the
registry through the zTOC builder, pushes the zTOCs and a SOCI index manifest
v1 whose subject is the platform's image manifest. The index is found through
the OCI referrers API, or the sha256-<hex> fallback tag on registries without
it. Layers already indexed (in the registry or the local cache) are reused.`,
		Example: `  indexer create registry.example.com/app:1.2
  indexer create --plain-http --all-platforms 127.0.0.1:5000/app:latest`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			ctx := cmd.Context()
			src, err := registry.New(args[0], o.registryOptions())
			if err != nil {
				return err
			}
			p, done, err := newPublisher(o, src, src, cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			img, err := p.resolveSource(ctx)
			if err != nil {
				return err
			}
			if err := p.findExisting(ctx, targetDescs(img.targets), img.index); err != nil {
				return err
			}
			results := p.indexPlatforms(ctx, img.targets)
			for _, r := range results {
				if r.Error != "" {
					continue
				}
				built, err := p.buildIndex(ctx, r, index.V1)
				if err == nil {
					err = src.PushManifest(ctx, built.Descriptor, built.Bytes, "")
				}
				if err != nil {
					r.Error = err.Error()
					continue
				}
				r.Index = built.Descriptor.Digest
			}
			return finish(cmd, o, runReport{Image: args[0], Platforms: results}, "v1")
		},
	}
	addIndexFlags(cmd, &o)
	return cmd
}

// finish prints the per-platform summary and fails when any platform did.
func finish(cmd *cobra.Command, o indexOptions, rep runReport, version string) error {
	out := cmd.OutOrStdout()
	var failed []string
	for _, r := range rep.Platforms {
		if r.Error != "" {
			failed = append(failed, fmt.Sprintf("%s: %s", r.Platform, r.Error))
		}
	}
	switch {
	case o.JSON:
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	case o.Quiet && rep.TargetDigest != "":
		fmt.Fprintln(out, rep.TargetDigest)
	case o.Quiet:
		for _, r := range rep.Platforms {
			if r.Index != "" {
				fmt.Fprintln(out, r.Index)
			}
		}
	default:
		for _, r := range rep.Platforms {
			if r.Index != "" {
				n := 0
				for _, l := range r.Layers {
					if l != nil && l.Ztoc != "" {
						n++
					}
				}
				fmt.Fprintf(out, "index    %s  SOCI index %s for %s (manifest %s, %d of %d layers)\n", r.Index, version, r.Platform, short(r.Manifest), n, len(r.Layers))
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d platforms failed:\n  %s", len(failed), len(rep.Platforms), strings.Join(failed, "\n  "))
	}
	return nil
}

// source is the image being indexed: its root manifest (an image index or
// a single manifest) and the platform manifests selected from it.
type source struct {
	root    ocispec.Descriptor
	raw     []byte
	targets []target
	index   *ocispec.Index // nil for a single manifest
}

// resolveSource fetches the source image and selects its platforms.
func (p *publisher) resolveSource(ctx context.Context) (*source, error) {
	raw, root, err := p.src.FetchManifest(ctx, referenceOrLatest(p.src))
	if err != nil {
		return nil, err
	}
	targets, idx, err := p.selectTargets(ctx, root, raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p.src.Name(), err)
	}
	return &source{root: root, raw: raw, targets: targets, index: idx}, nil
}

func referenceOrLatest(r *registry.Repository) string {
	if r.Reference() == "" {
		return "latest"
	}
	return r.Reference()
}

func targetDescs(ts []target) []ocispec.Descriptor {
	out := make([]ocispec.Descriptor, len(ts))
	for i, t := range ts {
		out[i] = t.desc
	}
	return out
}
