package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestCodesUpToDate: codes.go is what go generate writes from the
// miekg/pkcs11 that go.mod requires, byte for byte.
func TestCodesUpToDate(t *testing.T) {
	dir, ver, err := moduleDir()
	if err != nil {
		t.Fatal(err)
	}
	want, err := generate(filepath.Join(dir, "pkcs11t.h"), module+" "+ver)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join("..", "..", "codes.go"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("codes.go is not what go generate writes: run go generate in the module's root")
	}
}

// TestRefusesUnknownDefine: a CKR_ define that is not a plain number is an
// error, not an entry read wrongly.
func TestRefusesUnknownDefine(t *testing.T) {
	h := filepath.Join(t.TempDir(), "pkcs11t.h")
	text := "#define CRYPTOKI_VERSION_MAJOR 3\n#define CRYPTOKI_VERSION_MINOR 0\n#define CKR_OK 0x00000000UL\n#define CKR_ALIAS CKR_OK\n"
	if err := os.WriteFile(h, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := generate(h, "test"); err == nil {
		t.Fatal("an alias define was accepted")
	}
}
