package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/store"
)

// indexFlags are the flags shared by create and convert.
type indexFlags struct {
	SpanSize     int64
	MinLayerSize int64
	Platforms    []string
	AllPlatforms bool
	PlainHTTP    bool
	Insecure     bool
	Timeout      time.Duration
	Concurrency  int
	Force        bool
	Pack         bool
	Quiet        bool
	JSON         bool
	CacheDir     string
	NoCache      bool
}

func addIndexFlags(cmd *cobra.Command, o *indexFlags) {
	f := cmd.Flags()
	f.Int64Var(&o.SpanSize, "span-size", soci.DefaultSpanSize, "uncompressed bytes between checkpoints")
	f.Int64Var(&o.MinLayerSize, "min-layer-size", soci.DefaultMinLayerSize, "skip layers whose compressed size is below this many bytes")
	f.StringArrayVar(&o.Platforms, "platform", nil, "platform to index, os/arch[/variant] (repeatable; default: this machine's)")
	f.BoolVar(&o.AllPlatforms, "all-platforms", false, "index every platform of an image index")
	f.BoolVar(&o.PlainHTTP, "plain-http", false, "talk plain HTTP to the registry")
	f.BoolVar(&o.Insecure, "insecure", false, "skip TLS certificate verification")
	f.DurationVar(&o.Timeout, "timeout", registry.DefaultStallTimeout, "give up on a registry request that makes no progress for this long (it is retried a few times)")
	f.IntVar(&o.Concurrency, "concurrency", soci.DefaultConcurrency(), "layers indexed at once")
	f.BoolVar(&o.Force, "force", false, "rebuild zTOCs even when the registry or the local cache has them")
	f.BoolVar(&o.Pack, "pack", true, "also publish each zTOC's pack (a compact head and its windows, which spanpull mounts from); --pack=false publishes exactly SOCI's artifacts")
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

func (o indexFlags) registryOptions() registry.Options {
	return registry.Options{PlainHTTP: o.PlainHTTP, Insecure: o.Insecure, StallTimeout: o.Timeout}
}

func (o indexFlags) validate() error {
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

// platforms parses the --platform flags.
func (o indexFlags) platforms() ([]ocispec.Platform, error) {
	var out []ocispec.Platform
	for _, s := range o.Platforms {
		p, err := platforms.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("--platform %q: %w", s, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// indexRun is what create and convert do between parsing their flags and
// printing: it takes the engine's options and returns its result.
type indexRun func(ctx context.Context, opts soci.Options) (*soci.Result, error)

// run runs an indexing command: it bounds memory for the layers in flight,
// opens the local zTOC cache, shows layers as they finish (and a progress
// line on a terminal), and prints the result as text, digests or JSON.
func (o indexFlags) run(cmd *cobra.Command, rep runReport, do indexRun) error {
	pls, err := o.platforms()
	if err != nil {
		return err
	}
	concurrency := max(o.Concurrency, 1)
	limitMemory(concurrency)
	opts := soci.Options{SpanSize: o.SpanSize, MinLayerSize: o.MinLayerSize, Platforms: pls, AllPlatforms: o.AllPlatforms,
		Concurrency: concurrency, Force: o.Force, NoPack: !o.Pack}
	if !o.NoCache && o.CacheDir != "" {
		cache, err := store.OpenZtocCache(o.CacheDir)
		if err != nil {
			return err
		}
		defer cache.Close()
		opts.Cache = cache
	}
	printer := newLayerPrinter(cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
	defer printer.close()
	opts.Observer = printer
	res, err := do(cmd.Context(), opts)
	if err != nil {
		return err
	}
	return finish(cmd, o, rep.fill(res, o.MinLayerSize))
}

func newCreateCommand() *cobra.Command {
	var o indexFlags
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
			repo, err := registry.New(args[0], o.registryOptions())
			if err != nil {
				return err
			}
			return o.run(cmd, runReport{Image: args[0], version: "v1"}, func(ctx context.Context, opts soci.Options) (*soci.Result, error) {
				return soci.Create(ctx, repo, opts)
			})
		},
	}
	addIndexFlags(cmd, &o)
	return cmd
}
