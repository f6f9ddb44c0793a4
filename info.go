package hsm

import (
	"fmt"

	"github.com/miekg/pkcs11"
)

// ModuleInfo describes the PKCS#11 module (C_GetInfo).
type ModuleInfo struct {
	CryptokiVersion    string
	Manufacturer       string
	LibraryDescription string
	LibraryVersion     string
}

// ModuleInfo asks the module about itself. It makes one PKCS#11 call.
func (p *Provider) ModuleInfo() (ModuleInfo, error) {
	var mi ModuleInfo
	err := p.withSession("module info", func(in *instance, _ pkcs11.SessionHandle) error {
		info, err := in.ctx.GetInfo()
		if err != nil {
			return err
		}
		mi = ModuleInfo{
			CryptokiVersion:    fmt.Sprintf("%d.%d", info.CryptokiVersion.Major, info.CryptokiVersion.Minor),
			Manufacturer:       info.ManufacturerID,
			LibraryDescription: info.LibraryDescription,
			LibraryVersion:     fmt.Sprintf("%d.%d", info.LibraryVersion.Major, info.LibraryVersion.Minor),
		}
		return nil
	})
	return mi, err
}

// KeyInfo describes a private key on the token.
type KeyInfo struct {
	Ref KeyRef
	// Type is e.g. "RSA-2048", "ECDSA P-256", "Ed25519", or why the key
	// cannot be used ("unsupported: ...").
	Type                string
	CanSign, CanDecrypt bool
	// CanDerive: the key agrees keys (CKA_DERIVE; an EC key is then a
	// KeyExchanger).
	CanDerive bool
}

// maxKeys bounds the keys Keys lists.
const maxKeys = 100000

// Keys lists the private keys the provider can see on the token (at most
// 100,000), with their type and size; a key that cannot be used is listed
// with why. It makes a fixed number of finds (one of the private keys, and
// one of the public keys when an EC or Ed25519 key is among them) and one
// attribute read per object, and blocks as long as they take.
func (p *Provider) Keys() ([]KeyInfo, error) {
	var out []KeyInfo
	err := p.withSession("list keys", func(in *instance, s pkcs11.SessionHandle) (err error) {
		out, err = in.keysOnToken(s, maxKeys)
		return err
	})
	return out, err
}
