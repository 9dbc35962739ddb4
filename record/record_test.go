package record

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

var (
	testManifest = digest.FromString("manifest")
	testLayer1   = digest.FromString("layer1")
	testLayer2   = digest.FromString("layer2")
)

func testRecord() *Record {
	return &Record{
		Version: Version,
		Name:    "default",
		Image:   Image{Reference: "registry.example.com/app:1.2", Manifest: testManifest},
		Layers: []Layer{
			{Digest: testLayer1, Spans: []Span{{ID: 12, AtMicros: 1830}, {ID: 3, AtMicros: 2410}},
				Files: []File{{Path: "/usr/bin/python3.11", AtMicros: 1790}, {Path: "/usr/lib/libz.so.1", AtMicros: 1790}}},
			{Digest: testLayer2},
		},
	}
}

// The documented example shape: fields, order, empty lists written as [].
func TestMarshal(t *testing.T) {
	b, err := testRecord().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	want := `{
  "version": 1,
  "name": "default",
  "image": {
    "reference": "registry.example.com/app:1.2",
    "manifest": "` + testManifest.String() + `"
  },
  "layers": [
    {
      "digest": "` + testLayer1.String() + `",
      "spans": [
        {
          "id": 12,
          "at_us": 1830
        },
        {
          "id": 3,
          "at_us": 2410
        }
      ],
      "files": [
        {
          "path": "/usr/bin/python3.11",
          "at_us": 1790
        },
        {
          "path": "/usr/lib/libz.so.1",
          "at_us": 1790
        }
      ]
    },
    {
      "digest": "` + testLayer2.String() + `",
      "spans": [],
      "files": []
    }
  ]
}
`
	if string(b) != want {
		t.Fatalf("got\n%s\nwant\n%s", b, want)
	}
}

func TestFileRoundTrip(t *testing.T) {
	name := filepath.Join(t.TempDir(), "rec.json")
	r := testRecord()
	if err := WriteFile(name, r); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	r.Layers[1].Spans, r.Layers[1].Files = []Span{}, []File{}
	if !reflect.DeepEqual(got, r) {
		t.Fatalf("read back %+v, want %+v", got, r)
	}
	if ids := got.Layers[0].SpanIDs(); len(ids) != 2 || ids[0] != 12 || ids[1] != 3 {
		t.Fatalf("SpanIDs = %v", ids)
	}
	if got.Empty() || (&Record{Layers: []Layer{{Digest: testLayer1}}}).Empty() != true {
		t.Fatal("Empty is wrong")
	}
	if err := os.WriteFile(name, []byte(`{"version": 1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(name); err == nil || !strings.Contains(err.Error(), name) {
		t.Fatalf("ReadFile of a bad record: %v, want the file named", err)
	}
}

// Every rule of the format fails with an error naming the field.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(r *Record)
		want string
	}{
		{"version", func(r *Record) { r.Version = 2 }, "version 2, this build reads version 1"},
		{"no name", func(r *Record) { r.Name = "" }, "record: name"},
		{"bad name", func(r *Record) { r.Name = "a/b" }, "record: name"},
		{"no reference", func(r *Record) { r.Image.Reference = "" }, "image.reference is empty"},
		{"bad manifest", func(r *Record) { r.Image.Manifest = "sha256:xyz" }, "image.manifest"},
		{"bad layer digest", func(r *Record) { r.Layers[1].Digest = "md5:1" }, "layers[1] (md5:1): digest"},
		{"layer twice", func(r *Record) { r.Layers[1].Digest = testLayer1 }, "layers[1]: layer " + testLayer1.String() + " listed twice"},
		{"negative span", func(r *Record) { r.Layers[0].Spans[1].ID = -1 }, "spans[1]: negative span ID -1"},
		{"span twice", func(r *Record) { r.Layers[0].Spans[1].ID = 12 }, "spans[1]: span 12 listed twice"},
		{"span time order", func(r *Record) { r.Layers[0].Spans[1].AtMicros = 5 }, "spans[1]: at_us 5 before"},
		{"relative path", func(r *Record) { r.Layers[0].Files[0].Path = "usr/bin/x" }, `files[0]: path "usr/bin/x" is not a cleaned absolute path`},
		{"unclean path", func(r *Record) { r.Layers[0].Files[0].Path = "/usr/../etc" }, "not a cleaned absolute path"},
		{"empty path", func(r *Record) { r.Layers[0].Files[0].Path = "" }, "not a cleaned absolute path"},
		{"file twice", func(r *Record) { r.Layers[0].Files[1].Path = "/usr/bin/python3.11" }, "files[1]: /usr/bin/python3.11 listed twice"},
		{"file time order", func(r *Record) { r.Layers[0].Files[1].AtMicros = 1 }, "files[1]: at_us 1 before"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := testRecord()
			tc.edit(r)
			err := r.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want %q", err, tc.want)
			}
			if _, err := r.Marshal(); err == nil {
				t.Fatal("Marshal of an invalid record: no error")
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	good, err := testRecord().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		in, want string
	}{
		{strings.Replace(string(good), `"name"`, `"nmae"`, 1), `unknown field "nmae"`},
		{string(good) + "{}", "trailing data"},
		{`{"version": "1"}`, "cannot unmarshal"},
		{`[`, "unexpected EOF"},
		{strings.Replace(string(good), `"id": 3`, `"id": 12`, 1), "span 12 listed twice"},
		{strings.Repeat(" ", MaxSize+1), "byte limit"},
	} {
		if _, err := Parse([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%.40q) = %v, want %q", tc.in, err, tc.want)
		}
	}
	if _, err := Parse(good); err != nil {
		t.Fatal(err)
	}
}

func TestCleanPath(t *testing.T) {
	for in, want := range map[string]string{"usr/bin/": "/usr/bin", "./etc/passwd": "/etc/passwd", "/": "/", "": "/", "a/../../b": "/b"} {
		if got := CleanPath(in); got != want {
			t.Errorf("CleanPath(%q) = %q, want %q", in, got, want)
		}
	}
}
