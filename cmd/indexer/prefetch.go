package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/internal/cli"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/soci"
)

func newPrefetchCommand() *cobra.Command {
	return cli.Group(&cobra.Command{Use: "prefetch", Short: "Publish what a container start reads, for runtimes to fetch ahead (SOCI prefetch artifacts)"},
		newPrefetchAttachCommand())
}

// prefetchFlags are the flags of prefetch attach.
type prefetchFlags struct {
	remoteFlags
	name     string
	files    string
	force    bool
	platform string
	quiet    bool
	json     bool
}

func newPrefetchAttachCommand() *cobra.Command {
	var o prefetchFlags
	cmd := &cobra.Command{
		Use:   "attach [flags] IMAGE [RECORD.json]",
		Short: "Attach an access record (or a file list) to an image's SOCI index as prefetch artifacts",
		Long: `attach turns RECORD.json (made by "snapshotter record run" or exported from a
node with "snapshotter record export") into SOCI prefetch artifacts
(application/vnd.amazon.soci.prefetch.v1+json), one per layer the start read,
holding the spans it read with their order as priority (lower first), and
publishes them in a new version of the SOCI index a runtime would mount for
IMAGE. The zTOCs and packs of that index are reused: no layer is read.

With --files PATHS.txt instead of a record (one path per line, '#' comments),
each path is resolved against the top-most indexed layer whose table of
contents has it, as SOCI's --prefetch-file does, and becomes the spans of its
tar header and data, in list order.

Artifacts carry their workload's name (--name, default: the record's name)
in annotation dev.spanpull.prefetch.name; an image can have several, one per
workload, and attaching a name again replaces its artifacts.

  SOCI index v1 (indexer create): a new index is pushed as a referrer of the
  image manifest; it names the one it replaces, which discovery then skips.
  The image is unchanged.

  SOCI index v2 (indexer convert): a new index, the image manifest rewritten
  to name it and a new SOCI-enabled image index are pushed, and IMAGE's tag
  is moved to it: THE IMAGE DIGEST CHANGES (printed; with -q, alone).

attach refuses a record that names a layer the image does not have or has no
zTOC for, spans beyond a layer's span count, an empty record, and a record
made with another image manifest unless that manifest has the same layers
(or --force, as long as the record's layers are in the image).`,
		Example: `  snapshotter record run registry.example.com/app:1.2-soci --ready 'listening on' -o rec.json
  indexer prefetch attach registry.example.com/app:1.2-soci rec.json
  indexer prefetch attach --name batch --files paths.txt registry.example.com/app:1.2`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := o.attachOptions(cmd, args)
			if err != nil {
				return err
			}
			repo, err := o.repo(args[0])
			if err != nil {
				return err
			}
			res, err := soci.Attach(cmd.Context(), repo, opts)
			if err != nil {
				return err
			}
			return printAttach(cmd.OutOrStdout(), cmd.ErrOrStderr(), o, opts.Name, res)
		},
	}
	o.add(cmd)
	f := cmd.Flags()
	f.StringVar(&o.name, "name", "", `workload name of the artifacts (default: the record's name, or "`+record.DefaultName+`" with --files)`)
	f.StringVar(&o.files, "files", "", "file listing the paths to prefetch, one per line, instead of a record")
	f.BoolVar(&o.force, "force", false, "attach a record made with another image manifest whose layers the image has")
	f.StringVar(&o.platform, "platform", "", "image manifest of an image index to attach to, os/arch[/variant] (default: the record's manifest, else this machine's)")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "print only the new image digest (v2) or index digest (v1)")
	f.BoolVar(&o.json, "json", false, "print a JSON report")
	return cmd
}

// attachOptions reads the record or the file list named on the command
// line.
func (o prefetchFlags) attachOptions(cmd *cobra.Command, args []string) (soci.AttachOptions, error) {
	var opts soci.AttachOptions
	if o.quiet && o.json {
		return opts, errors.New("--quiet and --json exclude each other")
	}
	if o.platform != "" {
		p, err := platforms.Parse(o.platform)
		if err != nil {
			return opts, fmt.Errorf("--platform %q: %w", o.platform, err)
		}
		opts.Platform = &p
	}
	opts.Force, opts.Name = o.force, o.name
	switch {
	case len(args) == 2 && o.files != "":
		return opts, errors.New("give a RECORD.json or --files, not both")
	case o.files != "":
		paths, err := readPathList(o.files)
		if err != nil {
			return opts, err
		}
		opts.Files = paths
		if opts.Name == "" {
			opts.Name = record.DefaultName
		}
	case len(args) == 2:
		rec, err := record.ReadFile(args[1])
		if err != nil {
			return opts, err
		}
		if opts.Name == "" {
			opts.Name = rec.Name
		}
		opts.Manifest = rec.Image.Manifest
		for _, l := range rec.Layers {
			opts.Layers = append(opts.Layers, soci.LayerSpans{Layer: l.Digest, Spans: l.SpanIDs()})
		}
	default:
		return opts, fmt.Errorf("name a RECORD.json or give --files (see %s --help)", cmd.CommandPath())
	}
	return opts, nil
}

// readPathList reads a SOCI-style file list: one path per line, blank
// lines and lines starting with '#' ignored.
func readPathList(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var paths []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			paths = append(paths, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("%s lists no path", name)
	}
	return paths, nil
}

// attachReport is what "prefetch attach --json" prints.
type attachReport struct {
	Name       string          `json:"name"`
	Version    string          `json:"version"`
	Manifest   digest.Digest   `json:"manifest"`
	Previous   digest.Digest   `json:"previousIndex"`
	Index      digest.Digest   `json:"index"`
	Image      digest.Digest   `json:"image,omitempty"`
	Prefetches []attachedLayer `json:"prefetches"`
	Notes      []string        `json:"notes,omitempty"`
}

type attachedLayer struct {
	Layer    digest.Digest `json:"layer"`
	Prefetch digest.Digest `json:"prefetch"`
	Ranges   int           `json:"ranges"`
	Spans    int           `json:"spans"`
}

func printAttach(stdout, stderr io.Writer, o prefetchFlags, name string, res *soci.AttachResult) error {
	rep := attachReport{Name: name, Version: res.Version.String(), Manifest: res.Manifest.Digest, Previous: res.Previous.Digest,
		Index: res.Index.Digest, Image: res.Image.Digest, Notes: res.Notes}
	for _, p := range res.Prefetches {
		rep.Prefetches = append(rep.Prefetches, attachedLayer{Layer: p.Layer, Prefetch: p.Blob.Digest, Ranges: p.Ranges, Spans: p.Spans})
	}
	if o.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	for _, n := range rep.Notes {
		fmt.Fprintln(stderr, "note:", n)
	}
	if o.quiet {
		d := rep.Index
		if rep.Image != "" {
			d = rep.Image
		}
		_, err := fmt.Fprintln(stdout, d)
		return err
	}
	for _, p := range rep.Prefetches {
		fmt.Fprintf(stdout, "prefetch %s  layer %s  %d ranges, %d spans\n", short(p.Prefetch), p.Layer, p.Ranges, p.Spans)
	}
	fmt.Fprintf(stdout, "index    %s  SOCI index %s with prefetch %q (manifest %s; replaces %s)\n", rep.Index, rep.Version, name, short(rep.Manifest), short(rep.Previous))
	if rep.Image != "" {
		fmt.Fprintf(stdout, "image    %s  new SOCI-enabled image digest\n", rep.Image)
	}
	return nil
}
