package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/internal/cli"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

func newZtocCommand() *cobra.Command {
	return cli.Group(&cobra.Command{Use: "ztoc", Short: "Build and inspect zTOCs"},
		newZtocBuildCommand(), newZtocInfoCommand(), newZtocListCommand(), newZtocGetFileCommand())
}

func newZtocBuildCommand() *cobra.Command {
	var (
		spanSize int64
		out      string
		tool     string
	)
	cmd := &cobra.Command{
		Use:   "build [--span-size BYTES] -o OUT.ztoc LAYER",
		Short: "Build the zTOC of a local layer (.tar.gz or .tar) in one streaming pass",
		Long: `Build reads LAYER once and writes its zTOC: every tar entry, a decompressor
checkpoint at the first deflate block boundary after each --span-size bytes of
output, and the SHA-256 of every span's compressed bytes. Plain tar layers get
fixed-size spans.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return fmt.Errorf("missing -o OUT.ztoc")
			}
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			limitMemory(1)
			start := time.Now()
			z, layerDigest, err := ztoc.Build(cmd.Context(), f, ztoc.BuildOptions{SpanSize: spanSize, BuildToolIdentifier: tool})
			if err != nil {
				return fmt.Errorf("build zTOC of %s: %w", args[0], err)
			}
			b, err := ztoc.Marshal(z)
			if err != nil {
				return err
			}
			if err := atomicfile.WriteFile(filepath.Dir(out), filepath.Base(out), b); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "ztoc:          %s (%d bytes, %.2f%% of the layer)\n", digest.FromBytes(b), len(b), 100*float64(len(b))/float64(max(z.CompressedArchiveSize, 1)))
			fmt.Fprintf(w, "layer:         %s (%s, %d bytes, %d uncompressed)\n", layerDigest, z.Algorithm, z.CompressedArchiveSize, z.UncompressedArchiveSize)
			fmt.Fprintf(w, "spans:         %d\n", z.NumSpans())
			fmt.Fprintf(w, "files:         %d\n", len(z.Files))
			fmt.Fprintf(w, "time:          %s\n", time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().Int64Var(&spanSize, "span-size", ztoc.DefaultSpanSize, "uncompressed bytes between checkpoints")
	cmd.Flags().StringVarP(&out, "output", "o", "", "where to write the zTOC (required)")
	cmd.Flags().StringVar(&tool, "build-tool-identifier", ztoc.DefaultBuildToolIdentifier, "build tool string recorded in the zTOC")
	return cmd
}

// ztocInfo is the JSON of "ztoc info", with SOCI's field names.
type ztocInfo struct {
	Version           string         `json:"version"`
	BuildTool         string         `json:"build_tool"`
	Size              int64          `json:"size"`
	SpanSize          int64          `json:"span_size"`
	NumSpans          int            `json:"num_spans"`
	NumFiles          int            `json:"num_files"`
	NumMultiSpanFiles int            `json:"num_multi_span_files"`
	Files             []ztocFileInfo `json:"files"`
}

type ztocFileInfo struct {
	Filename  string `json:"filename"`
	Offset    int64  `json:"offset"`
	Size      int64  `json:"size"`
	Type      string `json:"type"`
	StartSpan int    `json:"start_span"`
	EndSpan   int    `json:"end_span"`
}

func newZtocInfoCommand() *cobra.Command {
	var rf remoteFlags
	cmd := &cobra.Command{
		Use:   "info ZTOC|REF@sha256:<ztoc digest>",
		Short: "Print a zTOC's summary and files as JSON (SOCI's field names)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			z, size, err := loadZtocArg(cmd.Context(), args[0], &rf)
			if err != nil {
				return err
			}
			spans, err := z.Spans()
			if err != nil {
				return err
			}
			spanSize, err := z.SpanSize()
			if err != nil {
				return err
			}
			info := ztocInfo{
				Version: z.Version, BuildTool: z.BuildToolIdentifier, Size: size, SpanSize: spanSize,
				NumSpans: z.NumSpans(), NumFiles: len(z.Files), Files: []ztocFileInfo{},
			}
			for _, f := range z.Files {
				first, last := fileSpans(spans, &f)
				if last != first {
					info.NumMultiSpanFiles++
				}
				info.Files = append(info.Files, ztocFileInfo{
					Filename: f.Name, Offset: f.UncompressedOffset, Size: f.UncompressedSize,
					Type: f.Type, StartSpan: int(first), EndSpan: int(last),
				})
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(info)
		},
	}
	rf.add(cmd)
	return cmd
}

// fileSpans returns the first and last span holding f's data (the span of
// its offset when it has none).
func fileSpans(spans []ztoc.Span, f *ztoc.FileMetadata) (first, last ztoc.SpanID) {
	first, _ = ztoc.SpanForOffset(spans, f.UncompressedOffset)
	last = first
	if f.Type == ztoc.TypeReg && f.UncompressedSize > 0 {
		last, _ = ztoc.SpanForOffset(spans, f.UncompressedOffset+f.UncompressedSize-1)
	}
	return first, last
}

func newZtocListCommand() *cobra.Command {
	var rf remoteFlags
	cmd := &cobra.Command{
		Use:     "ls ZTOC|REF@sha256:<ztoc digest>",
		Aliases: []string{"list"},
		Short:   "List a zTOC's entries like tar -tv",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			z, _, err := loadZtocArg(cmd.Context(), args[0], &rf)
			if err != nil {
				return err
			}
			// GNU tar -tv pads owner/group+size to a width that starts at 19
			// and only grows as it lists.
			w := bufio.NewWriter(cmd.OutOrStdout())
			width := 19
			for _, f := range z.Files {
				owner := f.Uname
				if owner == "" {
					owner = fmt.Sprint(f.UID)
				}
				group := f.Gname
				if group == "" {
					group = fmt.Sprint(f.GID)
				}
				size := fmt.Sprint(f.UncompressedSize)
				if f.Type == ztoc.TypeChar || f.Type == ztoc.TypeBlock {
					size = fmt.Sprintf("%d,%d", f.Devmajor, f.Devminor)
				}
				name := tarQuote(f.Name)
				switch f.Type {
				case ztoc.TypeSymlink:
					name += " -> " + tarQuote(f.Linkname)
				case ztoc.TypeHardlink:
					name += " link to " + tarQuote(f.Linkname)
				}
				owner += "/" + group
				width = max(width, len(owner)+1+len(size))
				fmt.Fprintf(w, "%s %s %*s %s %s\n", modeString(f.Type, f.Mode), owner, width-len(owner)-1, size, f.ModTime.Local().Format("2006-01-02 15:04"), name)
			}
			return w.Flush()
		},
	}
	rf.add(cmd)
	return cmd
}

// tarEscapes are the C escapes of GNU tar's "escape" quoting style.
var tarEscapes = map[byte]string{
	'\\': `\\`, '\a': `\a`, '\b': `\b`, '\f': `\f`, '\n': `\n`, '\r': `\r`, '\t': `\t`, '\v': `\v`,
}

// tarQuote escapes a name the way GNU tar's default "escape" quoting
// style does in listings, so that every entry stays on one line.
func tarQuote(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		esc, ok := tarEscapes[c]
		switch {
		case ok:
			b.WriteString(esc)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, "\\%03o", c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// modeString renders a tar mode the way tar -tv does, e.g. "-rwsr-xr-x".
func modeString(typ string, mode int64) string {
	var b [10]byte
	b[0] = map[string]byte{ztoc.TypeDir: 'd', ztoc.TypeSymlink: 'l', ztoc.TypeHardlink: 'h', ztoc.TypeChar: 'c', ztoc.TypeBlock: 'b', ztoc.TypeFifo: 'p'}[typ]
	if b[0] == 0 {
		b[0] = '-'
	}
	const rwx = "rwxrwxrwx"
	for i := range 9 {
		if mode&(1<<(8-i)) != 0 {
			b[1+i] = rwx[i]
		} else {
			b[1+i] = '-'
		}
	}
	special := func(bit int64, pos int, set, unset byte) {
		if mode&bit != 0 {
			if b[pos] == 'x' || b[pos] == 't' || b[pos] == 's' {
				b[pos] = set
			} else {
				b[pos] = unset
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(b[:])
}

func newZtocGetFileCommand() *cobra.Command {
	var (
		out string
		rf  remoteFlags
	)
	cmd := &cobra.Command{
		Use:   "get-file [-o OUT] ZTOC LAYER PATH",
		Short: "Extract one file from a layer, reading only the spans it covers",
		Long: `get-file looks PATH up in the zTOC, reads from LAYER only the compressed spans
that hold the file, verifies each against its digest and writes the file's
bytes to OUT (stdout by default). ZTOC and LAYER are local files or
REF@sha256:<digest> blobs in a registry (read with HTTP range requests).`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			z, _, err := loadZtocArg(ctx, args[0], &rf)
			if err != nil {
				return err
			}
			blob, size, closeBlob, err := openLayerArg(ctx, args[1], &rf)
			if err != nil {
				return err
			}
			defer closeBlob()
			if size != z.CompressedArchiveSize {
				return fmt.Errorf("zTOC %s does not match layer %s: it describes a %d-byte layer, the layer has %d bytes", args[0], args[1], z.CompressedArchiveSize, size)
			}
			f, err := z.Lookup(args[2])
			if err != nil {
				return err
			}
			// No span cache (and so no need for the layer's digest): each
			// span the file covers is fetched once.
			layer, err := span.NewLayer("", z, blob, span.Options{})
			if err != nil {
				return err
			}
			defer layer.Close()
			if out == "" || out == "-" {
				if _, err := layer.WriteFile(ctx, cmd.OutOrStdout(), f); err != nil {
					return fmt.Errorf("extract %s: %w", args[2], err)
				}
				return nil
			}
			tmp, err := os.CreateTemp(filepath.Dir(out), ".get-file-*")
			if err != nil {
				return err
			}
			defer os.Remove(tmp.Name())
			if _, err := layer.WriteFile(ctx, tmp, f); err != nil {
				tmp.Close()
				return fmt.Errorf("extract %s: %w", args[2], err)
			}
			if err := tmp.Close(); err != nil {
				return err
			}
			return os.Rename(tmp.Name(), out)
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "write the file here instead of stdout")
	rf.add(cmd)
	return cmd
}
