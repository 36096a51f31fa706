package xapisim

// SHA-256 of the guest's shadow copies: what each disk of a VM must hold,
// whatever migrations happened meanwhile. The demo compares it with a
// SHA-256 of the disk read back through GET /export_raw_vdi wherever the
// VM now runs (the source disk is gone after migrate_send).

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
)

var _ = addRegistrar(registerGuestHash)

func registerGuestHash() {
	Register(&Method{Name: "sim.guest_shadow_sha256", Unlocked: true, Params: []Param{p("vm", KRef)},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				return nil, err
			}
			sums, err := c.Sim.GuestShadowSHA256(uuid)
			if err != nil {
				return nil, Errorf(ErrInternal, err.Error())
			}
			return sums, nil
		}})
}

// GuestShadowSHA256 returns, by VBD userdevice, the hex SHA-256 of the
// guest's shadow copy of each disk of the VM (its content when the guest
// started plus every write since), over the disk's virtual size. The guest
// is held still while hashing; to compare with the disks themselves, stop
// the VM's writes first (pause or shut it down: the guest writes only while
// the VM runs).
func (s *Sim) GuestShadowSHA256(vmUUID string) (map[string]string, error) {
	g := s.ext().guest(vmUUID)
	if g == nil {
		return nil, ErrNoGuest
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	_, _, _, disks, err := s.locateVM(vmUUID)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, d := range disks {
		sh, ok := g.shadows[d.dev]
		if !ok {
			continue
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(sh, 0, d.size)); err != nil {
			return nil, fmt.Errorf("hash shadow of %s: %w", d.dev, err)
		}
		out[d.dev] = hex.EncodeToString(h.Sum(nil))
	}
	return out, nil
}
