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
}

// Keys lists the private keys the provider can see on the token (at most
// 10,000), with their type and size. It makes a few PKCS#11 calls per key.
func (p *Provider) Keys() ([]KeyInfo, error) {
	var out []KeyInfo
	err := p.withSession("list keys", func(in *instance, s pkcs11.SessionHandle) error {
		objs, err := in.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}, 10000)
		if err != nil {
			return err
		}
		for _, h := range objs {
			attrs, err := in.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return err
			}
			ref := KeyRef{ID: attrs[0].Value, Label: string(attrs[1].Value)}
			k, err := in.keyFromHandle(s, h, ref)
			if err != nil {
				if _, active := err.(*marked); active {
					return err
				}
				if code, ok := codeOf(err); ok && classify(code) != classCaller {
					return err
				}
				out = append(out, KeyInfo{Ref: ref, Type: "unsupported: " + err.Error()})
				continue
			}
			out = append(out, KeyInfo{Ref: k.ref, Type: k.describe(), CanSign: k.canSign, CanDecrypt: k.canDecrypt})
		}
		return nil
	})
	return out, err
}
